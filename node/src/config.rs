//! Node configuration: a strict TOML file, then `HELEXA_NODE_*` environment overrides, then
//! command-line flags (in `main.rs`), validated into [`Config`].
//!
//! Two stages as DESIGN.md §6 asks: [`RawConfig`] mirrors the file (`deny_unknown_fields`, so a
//! typo is an error, not a silently ignored key); [`Config`] holds resolved values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// File name of the default engine library, looked up next to the node binary.
pub const DEFAULT_ENGINE_FILE: &str = "libhelexa_engine_cuda.so";

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address to serve on (default `127.0.0.1:13131`).
    pub listen: Option<String>,
    /// Engine shared library (default: [`DEFAULT_ENGINE_FILE`] next to the node binary).
    pub engine: Option<PathBuf>,
    /// Where downloaded models go (default: the Hugging Face cache).
    pub cache_dir: Option<PathBuf>,
    /// Devices the engine may use (default: all).
    pub devices: Option<Vec<u32>>,
    /// Models to load at start-up.
    #[serde(default)]
    pub models: Vec<RawModel>,
    /// Admission limits.
    #[serde(default)]
    pub admission: RawAdmission,
}

/// A model to pre-warm.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Id to serve it under.
    pub id: String,
    /// Local directory, `.gguf` file or hub id.
    pub source: String,
    /// GGUF quantisation to pick.
    pub quant: Option<String>,
    /// Compute dtype for safetensors.
    pub dtype: Option<String>,
    /// Devices.
    pub devices: Option<Vec<u32>>,
    /// Context length.
    pub context_length: Option<u32>,
}

/// `[admission]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmission {
    /// Requests generating at once per model (default 4).
    pub max_in_flight: Option<u32>,
    /// Requests waiting per model beyond that (default 64); more are refused with 429.
    pub max_queue: Option<u32>,
    /// Longest a request waits in the queue before a 503 (default 30 s).
    pub queue_timeout_ms: Option<u64>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Engine library path.
    pub engine: PathBuf,
    /// Model download directory (`None` = Hugging Face cache).
    pub cache_dir: Option<PathBuf>,
    /// Devices for the engine.
    pub devices: Option<Vec<u32>>,
    /// Models to pre-warm.
    pub models: Vec<RawModel>,
    /// Admission limits.
    pub admission: Admission,
}

/// Per-model admission limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Concurrent generations.
    pub max_in_flight: u32,
    /// Queue length.
    pub max_queue: u32,
    /// Queue wait limit.
    pub queue_timeout: Duration,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            max_in_flight: 4,
            max_queue: 64,
            queue_timeout: Duration::from_secs(30),
        }
    }
}

impl RawConfig {
    /// Parse TOML text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Read and parse a file.
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Apply `HELEXA_NODE_LISTEN`, `HELEXA_NODE_ENGINE`, `HELEXA_NODE_CACHE_DIR`,
    /// `HELEXA_NODE_MAX_IN_FLIGHT`, `HELEXA_NODE_MAX_QUEUE` from `lookup` (the environment).
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<(), Error> {
        if let Some(v) = lookup("HELEXA_NODE_LISTEN") {
            self.listen = Some(v);
        }
        if let Some(v) = lookup("HELEXA_NODE_ENGINE") {
            self.engine = Some(v.into());
        }
        if let Some(v) = lookup("HELEXA_NODE_CACHE_DIR") {
            self.cache_dir = Some(v.into());
        }
        let number = |name: &str, v: String| {
            v.parse::<u32>()
                .map_err(|_| Error::Config(format!("{name}={v:?} is not a non-negative integer")))
        };
        if let Some(v) = lookup("HELEXA_NODE_MAX_IN_FLIGHT") {
            self.admission.max_in_flight = Some(number("HELEXA_NODE_MAX_IN_FLIGHT", v)?);
        }
        if let Some(v) = lookup("HELEXA_NODE_MAX_QUEUE") {
            self.admission.max_queue = Some(number("HELEXA_NODE_MAX_QUEUE", v)?);
        }
        Ok(())
    }

    /// Validate and fill defaults. `exe_dir` is where the node binary lives (engine default).
    pub fn validate(self, exe_dir: Option<&Path>) -> Result<Config, Error> {
        let listen_text = self
            .listen
            .unwrap_or_else(|| format!("127.0.0.1:{}", helexa_node_api::DEFAULT_NODE_PORT));
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            Error::Config(format!(
                "listen = {listen_text:?} is not an address like 127.0.0.1:13131"
            ))
        })?;
        let engine = match self.engine {
            Some(path) => path,
            None => exe_dir
                .map(|d| d.join(DEFAULT_ENGINE_FILE))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ENGINE_FILE)),
        };
        let defaults = Admission::default();
        let admission = Admission {
            max_in_flight: self
                .admission
                .max_in_flight
                .unwrap_or(defaults.max_in_flight),
            max_queue: self.admission.max_queue.unwrap_or(defaults.max_queue),
            queue_timeout: self
                .admission
                .queue_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(defaults.queue_timeout),
        };
        if admission.max_in_flight == 0 {
            return Err(Error::Config(
                "admission.max_in_flight must be at least 1".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for model in &self.models {
            if model.id.trim().is_empty() || model.source.trim().is_empty() {
                return Err(Error::Config(
                    "every [[models]] entry needs a non-empty id and source".into(),
                ));
            }
            if !seen.insert(model.id.clone()) {
                return Err(Error::Config(format!(
                    "model id {:?} appears twice in [[models]]",
                    model.id
                )));
            }
        }
        Ok(Config {
            listen,
            engine,
            cache_dir: self.cache_dir,
            devices: self.devices,
            models: self.models,
            admission,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let config = RawConfig::parse("")
            .and_then(|c| c.validate(Some(Path::new("/opt/helexa"))))
            .expect("empty config is valid");
        assert_eq!(config.listen.to_string(), "127.0.0.1:13131");
        assert_eq!(
            config.engine,
            PathBuf::from("/opt/helexa/libhelexa_engine_cuda.so")
        );
        assert_eq!(config.admission, Admission::default());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = RawConfig::parse("listne = \"0.0.0.0:1\"").expect_err("typo must fail");
        assert!(err.to_string().contains("unknown field `listne`"), "{err}");
        let err = RawConfig::parse("[admission]\nmax_inflight = 2").expect_err("typo must fail");
        assert!(err.to_string().contains("max_inflight"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let mut raw = RawConfig::parse("listen = \"127.0.0.1:1\"\n[admission]\nmax_queue = 3")
            .expect("valid");
        raw.apply_env(|name| match name {
            "HELEXA_NODE_LISTEN" => Some("0.0.0.0:9".into()),
            "HELEXA_NODE_MAX_QUEUE" => Some("7".into()),
            _ => None,
        })
        .expect("valid env");
        let config = raw.validate(None).expect("valid");
        assert_eq!(config.listen.to_string(), "0.0.0.0:9");
        assert_eq!(config.admission.max_queue, 7);
        let mut raw = RawConfig::default();
        assert!(
            raw.apply_env(|n| (n == "HELEXA_NODE_MAX_QUEUE").then(|| "x".into()))
                .is_err()
        );
    }

    #[test]
    fn bad_values() {
        for (text, needle) in [
            ("listen = \"nowhere\"", "not an address"),
            ("[admission]\nmax_in_flight = 0", "at least 1"),
            (
                "[[models]]\nid = \"a\"\nsource = \"x\"\n[[models]]\nid = \"a\"\nsource = \"y\"",
                "twice",
            ),
        ] {
            let err = RawConfig::parse(text)
                .and_then(|c| c.validate(None))
                .expect_err(text);
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }
}
