//! The engine as the node's server code sees it: a trait over the five calls of the engine ABI,
//! so the HTTP layer can be tested with an in-process fake (`fake` module, `test-support`
//! feature) and run in production on the `dlopen`ed engine ([`crate::engine::EngineHandle`]).

use helexa_engine_abi::json::{
    EngineInfo, GenerateParams, GenerateSummary, LoadSpec, LoadedModel, MemoryReport,
};
use helexa_engine_abi::{ErrorKind, Flow};

/// An engine call failed; `kind` decides the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BackendError {
    /// Category from the engine.
    pub kind: ErrorKind,
    /// Engine's message.
    pub message: String,
}

/// The engine calls the node makes. Every method may block: call them from `spawn_blocking`.
pub trait Backend: Send + Sync + 'static {
    /// Engine identity and devices.
    fn info(&self) -> Result<EngineInfo, BackendError>;
    /// Load model files.
    fn load_model(&self, spec: &LoadSpec) -> Result<LoadedModel, BackendError>;
    /// Free a model.
    fn unload_model(&self, handle: u64) -> Result<(), BackendError>;
    /// Current memory per device and model.
    fn memory(&self) -> Result<MemoryReport, BackendError>;
    /// Generate; `on_token` is called for every token (including a stop token) and may cancel.
    fn generate(
        &self,
        model: u64,
        params: &GenerateParams,
        prompt: &[u32],
        on_token: &mut (dyn FnMut(u32) -> Flow + Send),
    ) -> Result<GenerateSummary, BackendError>;
}

impl From<crate::engine::EngineCallError> for BackendError {
    fn from(e: crate::engine::EngineCallError) -> Self {
        Self {
            kind: e.kind,
            message: e.message,
        }
    }
}

impl Backend for crate::engine::EngineHandle {
    fn info(&self) -> Result<EngineInfo, BackendError> {
        Ok(crate::engine::EngineHandle::info(self)?)
    }

    fn load_model(&self, spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
        Ok(crate::engine::EngineHandle::load_model(self, spec)?)
    }

    fn unload_model(&self, handle: u64) -> Result<(), BackendError> {
        Ok(crate::engine::EngineHandle::unload_model(self, handle)?)
    }

    fn memory(&self) -> Result<MemoryReport, BackendError> {
        Ok(crate::engine::EngineHandle::memory(self)?)
    }

    fn generate(
        &self,
        model: u64,
        params: &GenerateParams,
        prompt: &[u32],
        on_token: &mut (dyn FnMut(u32) -> Flow + Send),
    ) -> Result<GenerateSummary, BackendError> {
        Ok(crate::engine::EngineHandle::generate(
            self, model, params, prompt, on_token,
        )?)
    }
}
