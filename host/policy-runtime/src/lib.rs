//! The policy runtime: runs the gateway's routing, eviction and translation policies as
//! WebAssembly components (WIT package `helexa:policy`, see `wit/README.md`) under wasmtime.
//!
//! This is the only crate of helexa that imports wasmtime. It
//! - compiles each component once, off the request path, through wasmtime's on-disk
//!   compilation cache (a second load of the same bytes is a cheap deserialisation);
//! - checks a component's world and WIT version from its export names *before*
//!   instantiating it, and refuses what it does not support with a message naming both;
//! - keeps a pool of pre-instantiated instances per plugin; router instances hold the
//!   catalogue and fleet resident and are told only when their version changes;
//! - bounds every call with an epoch deadline (a 1 ms ticker thread) and every instance
//!   with a memory limit; a trap, timeout or internal error of an operator plugin is
//!   counted, logged as `policy "<name>" v<version>: …` and answered by the embedded
//!   default policy instead, so a bad plugin never fails a request;
//! - per plugin ([`PluginOptions`]): its own deadline, a memory cap under the engine-wide
//!   ceiling, and a [`FailPolicy`] (fall back to the default, or reject with a 503 naming
//!   the plugin); calls are counted and timed per plugin and outcome;
//! - swaps whole [`PolicySet`]s atomically through a [`PolicyHandle`] (the gateway's
//!   hot reload builds them, see `helexa::policy::PluginManager`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use helexa_policy_runtime::*;
//!
//! # fn main() -> Result<(), Error> {
//! let registry = prometheus::Registry::new();
//! let runtime = PolicyRuntime::new(RuntimeConfig::default(), &registry)?;
//! let handle: PolicyHandle = Arc::new(arc_swap::ArcSwap::from_pointee(runtime.default_set()?));
//!
//! let catalogue = Arc::new(Catalogue { version: 1, entries: vec![] });
//! let fleet = Arc::new(Fleet { version: 1, nodes: vec![] });
//! let request = RequestInfo {
//!     model: "qwen3-8b".into(),
//!     surface: Surface::OpenaiChat,
//!     prompt_tokens_estimate: 0,
//!     max_output_tokens: None,
//!     stream: false,
//!     caller: None,
//!     headers: vec![],
//! };
//! let decision = handle.load().route(&request, &catalogue, &fleet);
//! # let _ = decision;
//! # Ok(())
//! # }
//! ```

#[doc(hidden)]
pub mod bench_inputs;
mod engine;
mod host;
mod inert_wasi;
mod metrics;
mod plugin;
mod set;
mod stream;
pub mod types;
mod wit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use plugin::{Plugin, PluginStatus};
pub use set::PolicySet;
pub use stream::ResponseStream;
pub use types::*;

/// The default policies built from `policies/` for `wasm32-wasip2` by `build.rs`.
pub mod embedded {
    /// `helexa-policy-router`: the default router component.
    pub const ROUTER: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/helexa_policy_router.wasm"));
    /// `helexa-policy-evictor`: the default evictor component.
    pub const EVICTOR: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/helexa_policy_evictor.wasm"));
    /// `helexa-policy-translator`: the default translator component.
    pub const TRANSLATOR: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/helexa_policy_translator.wasm"));
}

/// Deliberately misbehaving guests from `policies/test-guests/`, used by tests and by
/// `helexa plugin test`-style self checks. Always compiled in: they are a few KiB each.
pub mod test_guests {
    /// A router whose `route` never returns.
    pub const INFINITE_LOOP: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/helexa_guest_infinite_loop.wasm"));
    /// A router whose `route` allocates without bound.
    pub const MEMORY_BOMB: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/helexa_guest_memory_bomb.wasm"));
    /// A router whose `route` traps (panics).
    pub const TRAP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/helexa_guest_trap.wasm"));
    /// A router built against a WIT package version this runtime does not support.
    pub const WRONG_VERSION: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/helexa_guest_wrong_version.wasm"));
    /// A router that answers with a rejection carrying a 64 MiB message.
    pub const HUGE_OUTPUT: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/helexa_guest_huge_output.wasm"));
    /// A well-behaved router that serves everything on the node its settings name
    /// (`{"node": "b"}`): two settings make two observably different routers.
    pub const PIN_NODE: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/helexa_guest_pin_node.wasm"));
}

/// The hot-swap point the gateway holds: in-flight calls keep the `Arc<PolicySet>` they
/// loaded, new calls see the new set.
pub type PolicyHandle = Arc<arc_swap::ArcSwap<PolicySet>>;

/// How the runtime is set up.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Directory of wasmtime's compilation cache (precompiled artifacts keyed by the
    /// component's bytes, the engine configuration and the wasmtime version). `None`
    /// compiles every load from scratch.
    pub cache_dir: Option<PathBuf>,
    /// Per-call and per-instance bounds.
    pub limits: Limits,
}

/// Bounds on every policy call and instance.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Deadline of a router or evictor call (default 20 ms).
    pub call_deadline: Duration,
    /// Deadline of a translator call, including each stream call (default 200 ms).
    pub translate_deadline: Duration,
    /// Largest linear memory an instance may grow to (default 64 MiB). Growing past it traps.
    pub max_memory_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_deadline: Duration::from_millis(20),
            translate_deadline: Duration::from_millis(200),
            max_memory_bytes: 64 << 20,
        }
    }
}

/// Why a runtime could not be set up or a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The wasmtime engine (or its compilation cache) could not be created.
    #[error("policy runtime: engine setup failed: {0:#}")]
    Engine(#[source] wasmtime::Error),
    /// A metric could not be registered (usually: registered twice in one registry).
    #[error("policy runtime: registering metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The bytes are not a valid component, or it failed to compile.
    #[error("policy \"{name}\" v{version}: compiling the component failed: {source:#}")]
    Compile {
        /// Plugin name.
        name: String,
        /// Plugin version.
        version: String,
        /// The cause.
        #[source]
        source: wasmtime::Error,
    },
    /// The component implements another world, or an unsupported WIT version.
    #[error("policy \"{name}\" v{version}: {message}")]
    Incompatible {
        /// Plugin name.
        name: String,
        /// Plugin version.
        version: String,
        /// What it exports and what this runtime supports.
        message: String,
    },
    /// Linking or the first instantiation failed.
    #[error("policy \"{name}\" v{version}: instantiating the component failed: {source:#}")]
    Instantiate {
        /// Plugin name.
        name: String,
        /// Plugin version.
        version: String,
        /// The cause.
        #[source]
        source: wasmtime::Error,
    },
    /// `configure(settings)` returned an error or trapped.
    #[error("policy \"{name}\" v{version}: configure failed: {message}")]
    Configure {
        /// Plugin name.
        name: String,
        /// Plugin version.
        version: String,
        /// The guest's message (bad-settings) or the trap.
        message: String,
    },
}

/// Why a translation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The client's body was not understood: answer 400 with this message.
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// The translator (and the default behind it) failed: answer 500.
    #[error("translation failed: {0}")]
    Failed(String),
    /// An operator plugin failed and its fail policy is [`FailPolicy::Reject`]: answer
    /// 503 (the message names the plugin).
    #[error("{0}")]
    Unavailable(String),
}

/// What a plugin's failure (trap, timeout, error) turns into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// The embedded default policy answers instead (the default: a bad plugin costs
    /// nothing but its own decisions).
    #[default]
    Fallback,
    /// The request fails with a 503 naming the plugin (for operators who would rather
    /// refuse than route by rules they did not write).
    Reject,
}

/// Per-plugin bounds and failure handling; `None` takes the runtime's [`Limits`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginOptions {
    /// Epoch deadline of each call (router/evictor default [`Limits::call_deadline`],
    /// translator [`Limits::translate_deadline`]).
    pub deadline: Option<Duration>,
    /// Memory cap of each instance; never above [`Limits::max_memory_bytes`], which is
    /// the engine-wide ceiling (the pooling allocator's slot size).
    pub max_memory_bytes: Option<usize>,
    /// What a failure turns into.
    pub on_failure: FailPolicy,
}

/// What a component is, found by [`PolicyRuntime::inspect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentInfo {
    /// The world it implements (from the `helexa:policy` interface it exports).
    pub kind: PolicyKind,
    /// The WIT version of that interface, e.g. `0.1.0`.
    pub wit_version: String,
}

/// An expected failure reported by a policy (a fault is a trap instead).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyError {
    /// The input was not understood.
    InvalidInput(String),
    /// The policy's settings are wrong.
    BadSettings(String),
    /// Anything else.
    Internal(String),
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicyError::InvalidInput(m) => write!(f, "invalid input: {m}"),
            PolicyError::BadSettings(m) => write!(f, "bad settings: {m}"),
            PolicyError::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

/// The runtime: one wasmtime engine, its epoch ticker, metrics and the embedded defaults.
/// Cheap to clone.
#[derive(Clone)]
pub struct PolicyRuntime {
    shared: Arc<engine::Shared>,
    defaults: Arc<std::sync::Mutex<Option<engine::Defaults>>>,
}

impl PolicyRuntime {
    /// Create the engine (pooling allocator, epoch interruption), start the epoch ticker
    /// and register the metrics in `registry`. Compiles nothing yet.
    pub fn new(config: RuntimeConfig, registry: &prometheus::Registry) -> Result<Self, Error> {
        let shared = engine::Shared::new(config, registry)?;
        Ok(PolicyRuntime {
            shared: Arc::new(shared),
            defaults: Arc::default(),
        })
    }

    /// The embedded default policies as a set. Compiles them on first use (blocking: call
    /// it at startup or from `spawn_blocking`), later calls reuse the compiled defaults.
    pub fn default_set(&self) -> Result<PolicySet, Error> {
        let mut slot = self.defaults.lock().unwrap_or_else(|e| e.into_inner());
        let defaults = match slot.as_ref() {
            Some(defaults) => defaults.clone(),
            None => slot.insert(engine::Defaults::load(&self.shared)?).clone(),
        };
        Ok(PolicySet::from_defaults(defaults))
    }

    /// Compile `component_bytes`, check that it implements the world of `kind` at a
    /// supported WIT version, instantiate it once and `configure(settings)` it. Blocking
    /// (compilation takes up to ~100 ms uncached): never call it on an async request path.
    pub fn load_plugin(
        &self,
        kind: PolicyKind,
        name: &str,
        version: &str,
        component_bytes: &[u8],
        settings: &str,
    ) -> Result<Plugin, Error> {
        self.load_plugin_with(
            kind,
            name,
            version,
            component_bytes,
            settings,
            &PluginOptions::default(),
        )
    }

    /// [`PolicyRuntime::load_plugin`] with per-plugin deadline, memory cap and fail policy.
    pub fn load_plugin_with(
        &self,
        kind: PolicyKind,
        name: &str,
        version: &str,
        component_bytes: &[u8],
        settings: &str,
        options: &PluginOptions,
    ) -> Result<Plugin, Error> {
        Plugin::load(
            &self.shared,
            kind,
            name,
            version,
            component_bytes,
            settings,
            false,
            options,
        )
    }

    /// Compile `component_bytes` (through the compilation cache, so this also
    /// precompiles it for later loads) and find which world it implements and at which
    /// WIT version, refusing an unsupported version or a component that is no policy.
    /// `expected` refuses any other world. Blocking, like [`PolicyRuntime::load_plugin`].
    pub fn inspect(
        &self,
        name: &str,
        component_bytes: &[u8],
        expected: Option<PolicyKind>,
    ) -> Result<ComponentInfo, Error> {
        Plugin::inspect(&self.shared, name, component_bytes, expected)
    }

    /// The runtime's limits (the defaults of every plugin).
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Compilation cache statistics `(hits, misses)` since the runtime started; `None`
    /// without a cache directory.
    pub fn cache_stats(&self) -> Option<(usize, usize)> {
        self.shared.cache_stats()
    }
}
