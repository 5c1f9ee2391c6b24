//! The safe handle to an inference engine loaded through the C ABI (`helexa-engine-abi`).
//!
//! [`EngineHandle::open`] is the single `unsafe` decision point (loading a library trusts its
//! code); every other method is safe and typed with the [`json`] control types. All methods may
//! be called from any thread; [`EngineHandle::generate`] blocks its thread until the engine is done
//! (call it from `tokio::task::spawn_blocking`).
//!
//! ```no_run
//! use helexa_engine_abi::{Flow, json};
//! use helexa_node::engine::EngineHandle;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // SAFETY: the path is the helexa CPU engine built from this workspace.
//! let engine = unsafe { EngineHandle::open("target/debug/libhelexa_engine_cuda.so".as_ref()) }?;
//! println!("backend: {}", engine.info()?.backend);
//! let params = json::GenerateParams { max_tokens: 16, stop_ids: vec![2], sampling: Default::default() };
//! let mut tokens = Vec::new();
//! let summary = engine.generate(1, &params, &[1, 91, 97], |id| {
//!     tokens.push(id);
//!     Flow::Continue
//! })?;
//! println!("{tokens:?} {:?}", summary.finish);
//! # Ok(()) }
//! ```

#[allow(unsafe_code, reason = "the node's one module calling the engine C ABI")]
mod loader;

use std::path::PathBuf;
use std::sync::Arc;

use helexa_engine_abi::{ErrorKind, Flow, VersionMismatch, json};
use serde::de::DeserializeOwned;

/// A loaded engine instance. Cloning shares it; the engine is de-initialised when the last clone
/// is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<loader::LoadedEngine>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("origin", &self.inner.origin())
            .field("abi", &self.inner.abi())
            .finish()
    }
}

/// Loading an engine failed; every variant names the library.
#[derive(Debug, thiserror::Error)]
pub enum EngineLoadError {
    /// `dlopen` failed.
    #[error("engine {}: cannot load the library: {source}", path.display())]
    Open {
        /// Library path.
        path: PathBuf,
        /// The loader's error.
        source: libloading::Error,
    },
    /// The entry symbol is missing.
    #[error("engine {}: symbol `{symbol}` not found (not a helexa engine?): {source}", path.display())]
    MissingEntry {
        /// Library path.
        path: PathBuf,
        /// The symbol looked up.
        symbol: &'static str,
        /// The loader's error.
        source: libloading::Error,
    },
    /// The engine was built for an incompatible ABI version.
    #[error("engine {}: symbol `{symbol}`: {mismatch}", path.display())]
    AbiVersion {
        /// Library path.
        path: PathBuf,
        /// The entry symbol.
        symbol: &'static str,
        /// The two versions.
        mismatch: VersionMismatch,
    },
    /// The entry or vtable breaks the ABI (NULL function, missing interface, short vtable).
    #[error("engine {}: invalid entry: {reason}", path.display())]
    Invalid {
        /// Library path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The options could not be encoded.
    #[error("engine init options: {0}")]
    Options(#[source] serde_json::Error),
    /// The engine's `init` failed.
    #[error("engine {}: init failed: {source}", path.display())]
    Init {
        /// Library path.
        path: PathBuf,
        /// The engine's error.
        source: EngineCallError,
    },
}

/// An error reported by the engine (or by the node about the engine's answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("engine error ({kind}): {message}")]
pub struct EngineCallError {
    /// What kind of failure; `DeviceFault` means the model is poisoned until unloaded.
    pub kind: ErrorKind,
    /// The engine's message.
    pub message: String,
}

// The constructors `EngineHandle::open`, `open_with` and `from_entry` are `unsafe fn`s and live in
// `loader.rs`, the node's only module allowed to use `unsafe`.
impl EngineHandle {
    /// The ABI version `(major, minor)` the engine declared.
    pub fn abi_version(&self) -> (u32, u32) {
        self.inner.abi()
    }

    /// Backend, name, version and devices of the engine.
    pub fn info(&self) -> Result<json::EngineInfo, EngineCallError> {
        decode("EngineInfo", &self.inner.info()?)
    }

    /// Loads a model; the returned handle is what [`EngineHandle::generate`] takes.
    pub fn load_model(&self, spec: &json::LoadSpec) -> Result<json::LoadedModel, EngineCallError> {
        let spec = encode(spec)?;
        decode("LoadedModel", &self.inner.load_model(&spec)?)
    }

    /// Unloads a model (`NotFound` for an unknown handle).
    pub fn unload_model(&self, handle: u64) -> Result<(), EngineCallError> {
        self.inner.unload_model(handle)
    }

    /// Memory of every device and loaded model.
    pub fn memory(&self) -> Result<json::MemoryReport, EngineCallError> {
        decode("MemoryReport", &self.inner.memory_report()?)
    }

    /// Generates from `prompt`, calling `on_token` for every token on this thread; returning
    /// [`Flow::Cancel`] stops generation (the summary then says `Finish::Cancelled`).
    ///
    /// Blocks until the engine has finished: call it from `spawn_blocking`. A panic in `on_token`
    /// cancels generation and is resumed here once the engine has returned.
    pub fn generate(
        &self,
        model: u64,
        params: &json::GenerateParams,
        prompt: &[u32],
        mut on_token: impl FnMut(u32) -> Flow + Send,
    ) -> Result<json::GenerateSummary, EngineCallError> {
        let params = encode(params)?;
        let summary = self.inner.generate(model, &params, prompt, &mut on_token)?;
        decode("GenerateSummary", &summary)
    }
}

fn encode(value: &impl serde::Serialize) -> Result<Vec<u8>, EngineCallError> {
    serde_json::to_vec(value).map_err(|error| EngineCallError {
        kind: ErrorKind::BadInput,
        message: format!("cannot encode the request: {error}"),
    })
}

/// Decodes an engine answer; a malformed one is the engine's bug, hence `Internal`.
fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, EngineCallError> {
    serde_json::from_slice(bytes).map_err(|error| EngineCallError {
        kind: ErrorKind::Internal,
        message: format!("engine returned invalid {what} JSON: {error}"),
    })
}
