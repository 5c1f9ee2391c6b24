//! Hot reload of the policy set: the [`PluginManager`] builds a complete new
//! [`PolicySet`] from the plugin store (`active.toml`), the gateway config
//! (`[policies.*]`, `[plugins.settings.*]`, `[plugins.limits.*]`) and the embedded
//! defaults, and swaps it into the gateway's [`PolicyHandle`] in one atomic store.
//!
//! - Triggers: the store watcher ([`PluginManager::spawn_watcher`], debounced, one task),
//!   `POST /admin/plugins/reload`, SIGHUP (which also re-reads the config file, so
//!   changed settings reload too) and start-up. Reloads are serialised by a mutex.
//! - All or nothing: every plugin of the new set is compiled, version-checked,
//!   instantiated and configured before the swap; any failure keeps the running set
//!   and is recorded ([`PluginManager::health`], `/health`, `helexa plugin list`, logs).
//! - In-flight requests hold the `Arc<PolicySet>` they loaded and finish on it.
//! - Unchanged plugins (same bytes, settings and limits) are reused, not reloaded, so
//!   their warm instances and counters survive a reload of another world.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use helexa_policy_runtime::{
    Plugin, PolicyHandle, PolicyKind, PolicyRuntime, PolicySet, RuntimeConfig, embedded,
};
use serde::Serialize;

use super::runtime::{PolicyLoadError, RuntimePolicies, default_cache_dir};
use crate::config::{PluginsConfig, PoliciesConfig};
use crate::plugin_store::{PluginStore, sha256_hex};

const KINDS: [PolicyKind; 3] = [
    PolicyKind::Router,
    PolicyKind::Evictor,
    PolicyKind::Translator,
];

/// The live policy of one world, as `/health` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorldStatus {
    /// `router`, `evictor` or `translator`.
    pub world: PolicyKind,
    /// Plugin name (`default` for the embedded one).
    pub plugin: String,
    /// Its version.
    pub version: String,
    /// Where it came from: `store`, `config` or `default`.
    pub from: &'static str,
    /// Whether the last reload that concerned this world succeeded.
    pub last_reload_ok: bool,
    /// Why it failed, if it did.
    pub last_error: Option<String>,
}

/// The outcome of one reload.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// Whether the new set is live.
    pub ok: bool,
    /// What happened (the error when not ok).
    pub message: String,
    /// What asked for it (`watch`, `admin`, `sighup`, `startup`).
    pub trigger: String,
    /// When it finished, seconds since the Unix epoch.
    pub at: u64,
    /// How long it took, ms.
    pub took_ms: u64,
}

/// What reloads work on; held for a whole reload, which serialises them.
struct State {
    policies: PoliciesConfig,
    plugins: PluginsConfig,
    /// The plugin loaded per world and what it was loaded from (its reuse key).
    loaded: HashMap<PolicyKind, (String, Plugin, &'static str)>,
}

/// What `/health` shows; its own lock, held only to copy, so a health check never
/// waits for a reload in progress.
#[derive(Default)]
struct Status {
    /// Per world: last reload ok, its error.
    worlds: HashMap<PolicyKind, (bool, Option<String>)>,
    /// Per world: where the live plugin came from.
    from: HashMap<PolicyKind, &'static str>,
    last: Option<ReloadReport>,
}

/// Owns the hot-swap point and rebuilds the set on demand. Cheap to share (`Arc`).
pub struct PluginManager {
    runtime: PolicyRuntime,
    handle: PolicyHandle,
    store: PluginStore,
    /// The gateway config file, re-read on reloads that ask for it (SIGHUP, admin).
    config_path: Option<PathBuf>,
    state: Mutex<State>,
    status: Mutex<Status>,
}

impl std::fmt::Debug for PluginManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginManager")
            .field("store", &self.store.dir())
            .finish_non_exhaustive()
    }
}

impl PluginManager {
    /// Start the runtime (metrics into `registry`, limits from `[plugins]`), load the
    /// configured set (`[policies.*]`: an error there fails the start, as before) and
    /// then the store's active plugins (an error there is logged and recorded, and the
    /// gateway starts with the configured set). Blocking: compiles components.
    pub fn start(
        policies: PoliciesConfig,
        plugins: PluginsConfig,
        config_path: Option<PathBuf>,
        registry: &prometheus::Registry,
    ) -> Result<(RuntimePolicies, Arc<PluginManager>), PolicyLoadError> {
        let runtime = PolicyRuntime::new(
            RuntimeConfig {
                cache_dir: policies.cache_dir.clone().or_else(default_cache_dir),
                limits: plugins.runtime_limits(),
            },
            registry,
        )?;
        let mut loaded = HashMap::new();
        let mut set = runtime.default_set()?;
        for kind in KINDS {
            if let Some((key, plugin)) = load_configured(&runtime, kind, &policies)? {
                set = set.with(plugin.clone());
                loaded.insert(kind, (key, plugin, "config"));
            }
        }
        let status = Status {
            from: loaded.iter().map(|(k, (_, _, f))| (*k, *f)).collect(),
            ..Status::default()
        };
        let manager = Arc::new(PluginManager {
            handle: Arc::new(arc_swap::ArcSwap::from_pointee(set)),
            store: PluginStore::new(plugins.dir.clone()),
            runtime,
            config_path,
            state: Mutex::new(State {
                policies,
                plugins,
                loaded,
            }),
            status: Mutex::new(status),
        });
        manager.reload("startup", false);
        let policies = RuntimePolicies::with_manager(Arc::clone(&manager));
        Ok((policies, manager))
    }

    /// The hot-swap point.
    pub fn handle(&self) -> &PolicyHandle {
        &self.handle
    }

    /// The runtime.
    pub fn runtime(&self) -> &PolicyRuntime {
        &self.runtime
    }

    /// The store.
    pub fn store(&self) -> &PluginStore {
        &self.store
    }

    /// Replace the config the next reload uses (settings, limits, `[policies.*]`).
    pub fn set_config(&self, policies: PoliciesConfig, plugins: PluginsConfig) {
        let mut state = lock(&self.state);
        state.policies = policies;
        state.plugins = plugins;
    }

    /// Rebuild the set and swap it in; on any failure keep the running set. With
    /// `reread_config`, first re-read the gateway config file (a bad file fails the
    /// reload). Blocking: run it from `spawn_blocking`.
    pub fn reload(&self, trigger: &str, reread_config: bool) -> ReloadReport {
        let started = Instant::now();
        let mut state = lock(&self.state);
        let mut worlds = HashMap::new();
        let result = self.rebuild(&mut state, reread_config, &mut worlds);
        let report = ReloadReport {
            ok: result.is_ok(),
            message: match &result {
                Ok(summary) => summary.clone(),
                Err(message) => message.clone(),
            },
            trigger: trigger.to_owned(),
            at: unix_now(),
            took_ms: started.elapsed().as_millis() as u64,
        };
        match &result {
            Ok(summary) => {
                tracing::info!(
                    trigger,
                    took_ms = report.took_ms,
                    "policies reloaded: {summary}"
                )
            }
            Err(message) => tracing::warn!(
                trigger,
                "policy reload failed, keeping the running policies: {message}"
            ),
        }
        let mut status = lock(&self.status);
        status.worlds.extend(worlds);
        status.from = state.loaded.iter().map(|(k, (_, _, f))| (*k, *f)).collect();
        status.last = Some(report.clone());
        report
    }

    fn rebuild(
        &self,
        state: &mut State,
        reread_config: bool,
        worlds: &mut HashMap<PolicyKind, (bool, Option<String>)>,
    ) -> Result<String, String> {
        if reread_config && let Some(path) = &self.config_path {
            let config =
                crate::config::Config::load(path, &crate::config::Overrides::default(), &|name| {
                    std::env::var(name).ok()
                })
                .map_err(|e| format!("re-reading the config: {e}"))?;
            let limits = config.plugins.runtime_limits();
            if limits.max_memory_bytes > self.runtime.limits().max_memory_bytes {
                tracing::warn!(
                    "a plugin memory_mb above the ceiling the gateway started with ({} MiB) takes a restart; capping",
                    self.runtime.limits().max_memory_bytes >> 20
                );
            }
            state.policies = config.policies;
            state.plugins = config.plugins;
        }
        let active = self
            .store
            .active()
            .map_err(|e| format!("plugin store: {e}"))?;
        let mut next: HashMap<PolicyKind, (String, Plugin, &'static str)> = HashMap::new();
        let mut failures = Vec::new();
        for kind in KINDS {
            let outcome = match active.get(kind) {
                Some(name) => self.load_from_store(state, kind, name).map(Some),
                None => load_configured_reusing(&self.runtime, kind, state),
            };
            match outcome {
                Ok(Some((key, plugin, from))) => {
                    next.insert(kind, (key, plugin, from));
                }
                Ok(None) => {}
                Err(message) => {
                    worlds.insert(kind, (false, Some(message.clone())));
                    failures.push(format!("{kind}: {message}"));
                }
            }
        }
        if !failures.is_empty() {
            return Err(failures.join("; "));
        }
        let mut set: PolicySet = self
            .runtime
            .default_set()
            .map_err(|e| format!("default policies: {e}"))?;
        for (_, plugin, _) in next.values() {
            set = set.with(plugin.clone());
        }
        self.handle.store(Arc::new(set));
        let summary = KINDS
            .iter()
            .map(|kind| match next.get(kind) {
                Some((_, p, from)) => format!("{kind}={} v{} ({from})", p.name(), p.version()),
                None => format!("{kind}=default"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        for kind in KINDS {
            worlds.insert(kind, (true, None));
        }
        state.loaded = next;
        Ok(summary)
    }

    fn load_from_store(
        &self,
        state: &State,
        kind: PolicyKind,
        name: &str,
    ) -> Result<(String, Plugin, &'static str), String> {
        let manifest = self.store.get(name).map_err(|e| e.to_string())?;
        if manifest.world != kind {
            return Err(format!(
                "active.toml names \"{name}\" as the {kind}, but it is a {}",
                manifest.world
            ));
        }
        let settings = state.plugins.settings_json(name);
        let options = state.plugins.options(name);
        let key = format!(
            "store|{name}|{}|{}|{settings}|{options:?}",
            manifest.version, manifest.sha256
        );
        if let Some((old_key, plugin, _)) = state.loaded.get(&kind)
            && *old_key == key
        {
            return Ok((key, plugin.clone(), "store"));
        }
        let bytes = self.store.read_wasm(&manifest).map_err(|e| e.to_string())?;
        let plugin = self
            .runtime
            .load_plugin_with(kind, name, &manifest.version, &bytes, &settings, &options)
            .map_err(|e| e.to_string())?;
        Ok((key, plugin, "store"))
    }

    /// Per world: the live plugin and how the last reload went; plus the last report.
    pub fn health(&self) -> serde_json::Value {
        let status = lock(&self.status);
        let set = self.handle.load();
        let worlds: Vec<WorldStatus> = KINDS
            .iter()
            .map(|&kind| {
                let plugin = set.plugin(kind);
                let (ok, error) = status.worlds.get(&kind).cloned().unwrap_or((true, None));
                WorldStatus {
                    world: kind,
                    plugin: plugin.name().to_owned(),
                    version: plugin.version().to_owned(),
                    from: status.from.get(&kind).copied().unwrap_or("default"),
                    last_reload_ok: ok,
                    last_error: error,
                }
            })
            .collect();
        serde_json::json!({
            "store": self.store.dir(),
            "worlds": worlds,
            "last_reload": status.last,
        })
    }

    /// Watch the store directory (and the config file, if known) and reload, debounced,
    /// from one task. The watcher lives as long as the task (the runtime's lifetime).
    pub fn spawn_watcher(
        self: &Arc<Self>,
        debounce: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
        use notify::Watcher;

        std::fs::create_dir_all(self.store.dir()).map_err(notify::Error::io)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
        let store_dir = self.store.dir().to_path_buf();
        let config_file = self.config_path.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                let config_changed = config_file
                    .as_ref()
                    .is_some_and(|c| event.paths.iter().any(|p| p == c));
                if config_changed || event.paths.iter().any(|p| is_store_file(&store_dir, p)) {
                    let _ = tx.send(config_changed);
                }
            })?;
        watcher.watch(self.store.dir(), notify::RecursiveMode::NonRecursive)?;
        if let Some(parent) = self.config_path.as_ref().and_then(|c| c.parent()) {
            // The directory, not the file: editors replace files by renaming over them.
            watcher.watch(parent, notify::RecursiveMode::NonRecursive)?;
        }
        let manager = Arc::clone(self);
        Ok(tokio::spawn(async move {
            let _watcher = watcher;
            while let Some(mut config_changed) = rx.recv().await {
                // Debounce: an install writes two files; an editor several events.
                loop {
                    match tokio::time::timeout(debounce, rx.recv()).await {
                        Ok(Some(more)) => config_changed |= more,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let manager = Arc::clone(&manager);
                let _ =
                    tokio::task::spawn_blocking(move || manager.reload("watch", config_changed))
                        .await;
            }
        }))
    }
}

/// Whether a changed path is a store file that matters (not a hidden temporary).
fn is_store_file(store: &Path, path: &Path) -> bool {
    path.parent() == Some(store)
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.starts_with('.') && (n.ends_with(".toml") || n.ends_with(".wasm")))
}

/// `[policies.KIND]` of the config, reusing the loaded plugin when nothing changed.
fn load_configured_reusing(
    runtime: &PolicyRuntime,
    kind: PolicyKind,
    state: &State,
) -> Result<Option<(String, Plugin, &'static str)>, String> {
    let Some(key) = configured_key(kind, &state.policies).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if let Some((old_key, plugin, _)) = state.loaded.get(&kind)
        && *old_key == key
    {
        return Ok(Some((key, plugin.clone(), "config")));
    }
    load_configured(runtime, kind, &state.policies)
        .map(|loaded| loaded.map(|(key, plugin)| (key, plugin, "config")))
        .map_err(|e| e.to_string())
}

fn configured_key(
    kind: PolicyKind,
    policies: &PoliciesConfig,
) -> Result<Option<String>, PolicyLoadError> {
    let policy = policies.get(kind);
    let file = match &policy.plugin {
        Some(path) => {
            let bytes = super::runtime::read_plugin(kind, path)?;
            format!("{}|{}", path.display(), sha256_hex(&bytes))
        }
        None if policy.settings_json != "{}" => "embedded".to_owned(),
        None => return Ok(None),
    };
    Ok(Some(format!(
        "config|{file}|{}|{}",
        policy.version, policy.settings_json
    )))
}

fn load_configured(
    runtime: &PolicyRuntime,
    kind: PolicyKind,
    policies: &PoliciesConfig,
) -> Result<Option<(String, Plugin)>, PolicyLoadError> {
    let Some(key) = configured_key(kind, policies)? else {
        return Ok(None);
    };
    let default_bytes = match kind {
        PolicyKind::Router => embedded::ROUTER,
        PolicyKind::Evictor => embedded::EVICTOR,
        PolicyKind::Translator => embedded::TRANSLATOR,
    };
    let plugin = super::runtime::load_one(runtime, kind, policies.get(kind), default_bytes)?;
    Ok(plugin.map(|p| (key, p)))
}

impl PoliciesConfig {
    /// The `[policies.KIND]` section.
    pub fn get(&self, kind: PolicyKind) -> &crate::config::PolicyConfig {
        match kind {
            PolicyKind::Router => &self.router,
            PolicyKind::Evictor => &self.evictor,
            PolicyKind::Translator => &self.translator,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
