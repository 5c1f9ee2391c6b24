//! The production [`Policies`]: the WASM policies of `helexa-policy-runtime`, behind its
//! hot-swappable [`PolicyHandle`] (each call loads the current set; in-flight streams
//! keep the instance they started with).

use std::path::Path;
use std::sync::Arc;

use helexa_policy_runtime::{
    PolicyHandle, PolicyKind, PolicyRuntime, PolicySet, ResponseStream, RuntimeConfig, embedded,
};

use super::{
    Catalogue, CatalogueEntry, Decision, EventStream, Fleet, Node, Policies, RequestInfo, SseEvent,
    Surface, TranslateError,
};
use crate::config::{PoliciesConfig, PolicyConfig};

/// Why the policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    /// The runtime or a plugin failed.
    #[error(transparent)]
    Runtime(#[from] helexa_policy_runtime::Error),
    /// A configured plugin failed to load (refused as incompatible, failed to compile,
    /// instantiate or configure): the message names the config section and the file.
    #[error("[policies.{kind}] plugin {path}: {source}")]
    Plugin {
        /// Which policy.
        kind: PolicyKind,
        /// The file.
        path: String,
        /// The runtime's reason (it names the plugin, its version and the WIT versions).
        #[source]
        source: helexa_policy_runtime::Error,
    },
    /// A plugin file could not be read.
    #[error("reading the {kind} plugin {path}: {source}")]
    Read {
        /// Which policy.
        kind: PolicyKind,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The runtime's policy set as the gateway's [`Policies`].
#[derive(Clone)]
pub struct RuntimePolicies {
    /// The hot-swap point (a plugin reload stores a new set here).
    pub handle: PolicyHandle,
    /// The runtime, for loading replacement plugins.
    pub runtime: PolicyRuntime,
    /// The hot-reload manager, when the set comes from one (`helexa serve`).
    pub plugins: Option<Arc<super::plugins::PluginManager>>,
}

/// Start the runtime (metrics into `registry`) and build the configured set: the
/// embedded defaults, with each configured plugin (or the default re-configured with
/// non-empty settings) swapped in. Blocking: compiles components.
pub fn load(
    config: &PoliciesConfig,
    registry: &prometheus::Registry,
) -> Result<RuntimePolicies, PolicyLoadError> {
    let runtime_config = RuntimeConfig {
        cache_dir: config.cache_dir.clone().or_else(default_cache_dir),
        ..RuntimeConfig::default()
    };
    let runtime = PolicyRuntime::new(runtime_config, registry)?;
    let mut set = runtime.default_set()?;
    for (kind, policy, default_bytes) in [
        (PolicyKind::Router, &config.router, embedded::ROUTER),
        (PolicyKind::Evictor, &config.evictor, embedded::EVICTOR),
        (
            PolicyKind::Translator,
            &config.translator,
            embedded::TRANSLATOR,
        ),
    ] {
        if let Some(plugin) = load_one(&runtime, kind, policy, default_bytes)? {
            set = set.with(plugin);
        }
    }
    Ok(RuntimePolicies {
        handle: Arc::new(arc_swap::ArcSwap::from_pointee(set)),
        runtime,
        plugins: None,
    })
}

/// Compiling a component takes 40–140 ms per policy; the on-disk cache makes every start after
/// the first load precompiled artifacts instead (~0.1 ms).
pub(crate) fn default_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".cache"))
        })?;
    Some(base.join("helexa").join("policies"))
}

/// The bytes of a configured plugin file.
pub(crate) fn read_plugin(kind: PolicyKind, path: &Path) -> Result<Vec<u8>, PolicyLoadError> {
    std::fs::read(path).map_err(|source| PolicyLoadError::Read {
        kind,
        path: path.display().to_string(),
        source,
    })
}

pub(crate) fn load_one(
    runtime: &PolicyRuntime,
    kind: PolicyKind,
    policy: &PolicyConfig,
    default_bytes: &[u8],
) -> Result<Option<helexa_policy_runtime::Plugin>, PolicyLoadError> {
    match &policy.plugin {
        Some(path) => {
            let bytes = read_plugin(kind, path)?;
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("plugin");
            runtime
                .load_plugin(kind, name, &policy.version, &bytes, &policy.settings_json)
                .map(Some)
                .map_err(|source| PolicyLoadError::Plugin {
                    kind,
                    path: path.display().to_string(),
                    source,
                })
        }
        None if policy.settings_json != "{}" => Ok(Some(runtime.load_plugin(
            kind,
            "default",
            &policy.version,
            default_bytes,
            &policy.settings_json,
        )?)),
        None => Ok(None),
    }
}

impl RuntimePolicies {
    /// Wrap an existing set (tests).
    pub fn from_set(runtime: PolicyRuntime, set: PolicySet) -> Self {
        RuntimePolicies {
            handle: Arc::new(arc_swap::ArcSwap::from_pointee(set)),
            runtime,
            plugins: None,
        }
    }

    /// The policies of a hot-reload manager (its handle and runtime).
    pub fn with_manager(manager: Arc<super::plugins::PluginManager>) -> Self {
        RuntimePolicies {
            handle: Arc::clone(manager.handle()),
            runtime: manager.runtime().clone(),
            plugins: Some(manager),
        }
    }
}

impl Policies for RuntimePolicies {
    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &Arc<Catalogue>,
        fleet: &Arc<Fleet>,
    ) -> Decision {
        self.handle.load().route(request, catalogue, fleet)
    }

    fn choose_victims(&self, on: &Node, need_mb: u64, incoming: &CatalogueEntry) -> Vec<String> {
        self.handle.load().choose_victims(on, need_mb, incoming)
    }

    fn request_to_chat(&self, from: Surface, body: &str) -> Result<String, TranslateError> {
        self.handle.load().request_to_chat(from, body)
    }

    fn response_from_chat(
        &self,
        to: Surface,
        request: &str,
        body: &str,
    ) -> Result<String, TranslateError> {
        self.handle.load().response_from_chat(to, request, body)
    }

    fn response_stream(
        &self,
        to: Surface,
        request: &str,
        response_id: &str,
    ) -> Result<Box<dyn EventStream>, TranslateError> {
        Ok(Box::new(self.handle.load().response_stream(
            to,
            request,
            response_id,
        )?))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::to_value(self.handle.load().describe()).unwrap_or_default()
    }

    fn plugins_health(&self) -> serde_json::Value {
        self.plugins
            .as_ref()
            .map_or(serde_json::Value::Null, |m| m.health())
    }
}

impl EventStream for ResponseStream {
    fn push(&mut self, chunk: &str) -> Result<Vec<SseEvent>, TranslateError> {
        ResponseStream::push(self, chunk)
    }

    fn keepalive(&mut self) -> Vec<SseEvent> {
        ResponseStream::keepalive(self)
    }

    fn finish(&mut self) -> Result<Vec<SseEvent>, TranslateError> {
        ResponseStream::finish(self)
    }

    fn fail(&mut self, message: &str) -> Vec<SseEvent> {
        ResponseStream::fail(self, message)
    }
}
