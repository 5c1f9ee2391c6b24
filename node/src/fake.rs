//! An in-process engine for tests (`test-support` feature): it "generates" a scripted token
//! sequence chosen from the prompt, honours `max_tokens`, stop ids and cancellation exactly as
//! the ABI describes, and reports memory. Server tests use it to exercise the HTTP layer with a
//! real tokenizer and template but without loading an engine library.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use helexa_engine_abi::json::{
    DeviceInfo, EngineInfo, Finish, GenerateParams, GenerateSummary, LoadSpec, LoadedModel,
    MemoryReport, ModelMemory,
};
use helexa_engine_abi::{ErrorKind, Flow};

use crate::backend::{Backend, BackendError};

/// Picks the generated tokens for a prompt.
pub type Script = Box<dyn Fn(&[u32]) -> Vec<u32> + Send + Sync>;

/// See the module docs.
pub struct FakeBackend {
    script: Script,
    models: Mutex<HashMap<u64, String>>,
    next_handle: AtomicU64,
    /// Architectures `load_model` accepts.
    pub architectures: Vec<String>,
    /// Device memory, MiB.
    pub total_mb: u64,
    /// Sleep before every token (to keep requests in flight in admission tests).
    pub token_delay: Option<Duration>,
    /// Prompt tokens reported as reused from the prefix cache.
    pub reused_prompt_tokens: u32,
    /// Sleep inside `load_model` (to test callers that give up on a slow load).
    pub load_delay: Option<Duration>,
    /// While set, `generate` fails with a `DeviceFault` (the device died mid-request).
    pub device_fault: AtomicBool,
}

impl FakeBackend {
    /// A fake that answers every prompt with `script(prompt)`.
    pub fn new(script: Script) -> Self {
        Self {
            script,
            models: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            architectures: vec!["Qwen3ForCausalLM".into(), "qwen3".into()],
            total_mb: 1024,
            token_delay: None,
            reused_prompt_tokens: 0,
            load_delay: None,
            device_fault: AtomicBool::new(false),
        }
    }

    fn device(&self) -> DeviceInfo {
        DeviceInfo {
            index: 0,
            name: "fake".into(),
            vram_total_mb: self.total_mb,
            vram_free_mb: self.total_mb,
            compute_capability: None,
        }
    }
}

impl Backend for FakeBackend {
    fn info(&self) -> Result<EngineInfo, BackendError> {
        Ok(EngineInfo {
            backend: "cpu".into(),
            name: "fake".into(),
            version: "0.0.0".into(),
            devices: vec![self.device()],
        })
    }

    fn load_model(&self, spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
        if !self.architectures.contains(&spec.architecture) {
            return Err(BackendError {
                kind: ErrorKind::Unsupported,
                message: format!("architecture {} is not supported", spec.architecture),
            });
        }
        if let Some(delay) = self.load_delay {
            std::thread::sleep(delay);
        }
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.models
            .lock()
            .map_err(|_| internal("poisoned"))?
            .insert(handle, spec.id.clone());
        Ok(LoadedModel {
            handle,
            vram_mb: 1,
            devices: vec![0],
            context_length: spec.context_length.unwrap_or(4096),
            dtype: "f32".into(),
            quant: "none".into(),
            vocab_size: 2048,
        })
    }

    fn unload_model(&self, handle: u64) -> Result<(), BackendError> {
        match self
            .models
            .lock()
            .map_err(|_| internal("poisoned"))?
            .remove(&handle)
        {
            Some(_) => Ok(()),
            None => Err(BackendError {
                kind: ErrorKind::NotFound,
                message: format!("no model {handle}"),
            }),
        }
    }

    fn memory(&self) -> Result<MemoryReport, BackendError> {
        let models = self.models.lock().map_err(|_| internal("poisoned"))?;
        Ok(MemoryReport {
            devices: vec![self.device()],
            models: models
                .keys()
                .map(|&handle| ModelMemory { handle, vram_mb: 1 })
                .collect(),
        })
    }

    fn generate(
        &self,
        model: u64,
        params: &GenerateParams,
        prompt: &[u32],
        on_token: &mut (dyn FnMut(u32) -> Flow + Send),
    ) -> Result<GenerateSummary, BackendError> {
        if !self
            .models
            .lock()
            .map_err(|_| internal("poisoned"))?
            .contains_key(&model)
        {
            return Err(BackendError {
                kind: ErrorKind::NotFound,
                message: format!("no model {model}"),
            });
        }
        if self.device_fault.load(Ordering::SeqCst) {
            return Err(BackendError {
                kind: ErrorKind::DeviceFault,
                message: "fake device lost".into(),
            });
        }
        let mut summary = GenerateSummary {
            prompt_tokens: prompt.len() as u32,
            reused_prompt_tokens: self.reused_prompt_tokens.min(prompt.len() as u32),
            generated_tokens: 0,
            finish: Finish::Length,
            stop_id: None,
            decode_timing: None,
        };
        for token in (self.script)(prompt) {
            if summary.generated_tokens >= params.max_tokens {
                return Ok(summary);
            }
            if let Some(delay) = self.token_delay {
                std::thread::sleep(delay);
            }
            summary.generated_tokens += 1;
            let flow = on_token(token);
            if params.stop_ids.contains(&token) {
                summary.finish = Finish::Stop;
                summary.stop_id = Some(token);
                return Ok(summary);
            }
            if flow == Flow::Cancel {
                summary.finish = Finish::Cancelled;
                return Ok(summary);
            }
        }
        Ok(summary)
    }
}

fn internal(message: &str) -> BackendError {
    BackendError {
        kind: ErrorKind::Internal,
        message: message.into(),
    }
}
