//! The wasmtime engine, its epoch ticker and the compiled default policies, shared by a
//! runtime and every plugin loaded from it (a plugin keeps the ticker alive).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{
    Cache, CacheConfig, Config, Engine, InstanceAllocationStrategy, OptLevel,
    PoolingAllocationConfig,
};

use crate::host::HostState;
use crate::metrics::Metrics;
use crate::plugin::Plugin;
use crate::{Error, Limits, PolicyKind, RuntimeConfig, embedded, wit};

/// Epoch period: deadlines are counted in these ticks.
pub(crate) const TICK: Duration = Duration::from_millis(1);

/// Instances (all plugins together) the pooling allocator reserves slots for. Bounded so
/// a flood of concurrent streams cannot exhaust memory; past it, instantiation fails and
/// the call falls back / fails cleanly.
const MAX_INSTANCES: u32 = 256;
/// Core modules in one component (a Rust `wasm32-wasip2` component has the program, the
/// WASI adapter and small shims, ~5; componentize-py links CPython, libc and its glue as
/// separate modules, 14).
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// Linear memories of one component (the program's, plus the adapter's if it has one).
const MEMORIES_PER_COMPONENT: u32 = 2;

/// The embedded defaults, compiled once per runtime. Held by the runtime, not by
/// [`Shared`]: plugins hold `Shared`, and a plugin inside `Shared` would be a cycle.
#[derive(Clone)]
pub(crate) struct Defaults {
    pub(crate) router: Plugin,
    pub(crate) evictor: Plugin,
    pub(crate) translator: Plugin,
}

impl Defaults {
    pub(crate) fn load(shared: &Arc<Shared>) -> Result<Self, Error> {
        let version = env!("CARGO_PKG_VERSION");
        let load = |kind, bytes: &[u8]| {
            Plugin::load(
                shared,
                kind,
                "default",
                version,
                bytes,
                "{}",
                true,
                &crate::PluginOptions::default(),
            )
        };
        Ok(Defaults {
            router: load(PolicyKind::Router, embedded::ROUTER)?,
            evictor: load(PolicyKind::Evictor, embedded::EVICTOR)?,
            translator: load(PolicyKind::Translator, embedded::TRANSLATOR)?,
        })
    }
}

pub(crate) struct Shared {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<HostState>,
    pub(crate) limits: Limits,
    pub(crate) metrics: Metrics,
    cache: Option<Cache>,
    ticker: Ticker,
}

impl Shared {
    pub(crate) fn new(
        config: RuntimeConfig,
        registry: &prometheus::Registry,
    ) -> Result<Self, Error> {
        let limits = config.limits;
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            .parallel_compilation(true);

        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_component_instances(MAX_INSTANCES)
            .total_core_instances(MAX_INSTANCES * CORE_INSTANCES_PER_COMPONENT)
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .total_memories(MAX_INSTANCES * MEMORIES_PER_COMPONENT)
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .total_tables(MAX_INSTANCES * MEMORIES_PER_COMPONENT)
            .max_tables_per_component(MEMORIES_PER_COMPONENT * 2)
            .max_memory_size(limits.max_memory_bytes);
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));

        // Precompiled artifacts: wasmtime's own compilation cache, keyed by the component's
        // bytes, the engine configuration and the wasmtime version. It is the unsafe-free
        // alternative to writing `.cwasm` files ourselves and loading them with the
        // `unsafe` `Component::deserialize_file` (which trusts the file blindly): the cache
        // validates what it loads, and a changed engine setting can never load a stale
        // artifact. A hit costs a decompression instead of a 40-140 ms compilation.
        let cache = match &config.cache_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::Engine(wasmtime::format_err!(
                        "creating the compilation cache directory {}: {e}",
                        dir.display()
                    ))
                })?;
                let mut cache_config = CacheConfig::new();
                cache_config.with_directory(dir);
                let cache = Cache::new(cache_config).map_err(Error::Engine)?;
                wasm.cache(Some(cache.clone()));
                Some(cache)
            }
            None => None,
        };

        let engine = Engine::new(&wasm).map_err(Error::Engine)?;
        let mut linker = Linker::new(&engine);
        wit::add_to_linker(&mut linker).map_err(Error::Engine)?;
        let metrics = Metrics::register(registry)?;
        let ticker = Ticker::start(engine.clone()).map_err(Error::Engine)?;
        Ok(Shared {
            engine,
            linker,
            limits,
            metrics,
            cache,
            ticker,
        })
    }

    pub(crate) fn cache_stats(&self) -> Option<(usize, usize)> {
        self.cache
            .as_ref()
            .map(|c| (c.cache_hits(), c.cache_misses()))
    }

    /// Epoch ticks for a deadline (rounded up, plus one because the current tick is
    /// already partly gone).
    pub(crate) fn ticks(&self, deadline: Duration) -> u64 {
        let _ = &self.ticker;
        (deadline.as_micros().div_ceil(TICK.as_micros()) as u64).max(1) + 1
    }
}

/// A thread that advances the engine's epoch every [`TICK`]; stopped when the last
/// holder of [`Shared`] goes away.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine) -> wasmtime::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("helexa-policy-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .map_err(|e| wasmtime::format_err!("starting the epoch ticker thread: {e}"))?;
        Ok(Ticker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // The thread wakes within one tick; joining keeps tests from leaking threads.
            let _ = thread.join();
        }
    }
}
