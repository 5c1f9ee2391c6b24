//! SDK for helexa policy plugins (`helexa:policy@0.1.0` WebAssembly components).
//!
//! A policy is plain Rust over the plain types of [`types`] (re-exported here),
//! implementing one of three traits — [`Router`], [`Evictor`] or [`Translator`] (with
//! its [`TranslatorStream`]) — and exported with one macro:
//!
//! ```ignore
//! use helexa_policy_sdk::{CatalogueEntry, Decision, Fleet, PolicyError, RequestInfo, Router};
//!
//! pub struct MyRouter;
//!
//! impl Router for MyRouter {
//!     fn configure(settings: &str) -> Result<Self, PolicyError> { Ok(MyRouter) }
//!     fn route(&self, request: &RequestInfo, catalogue: &[CatalogueEntry], fleet: &Fleet)
//!         -> Result<Decision, PolicyError> { todo!() }
//! }
//!
//! #[cfg(target_arch = "wasm32")]
//! helexa_policy_sdk::export_router!(MyRouter);
//! ```
//!
//! The crate is `crate-type = ["cdylib", "rlib"]` and builds with
//! `cargo build --target wasm32-wasip2 --profile policy -p <crate>`. Keeping the
//! macro call behind `cfg(target_arch = "wasm32")` lets native unit tests link.
//!
//! This crate is the only place that runs `wit_bindgen::generate!` ([`bindings`]);
//! the `export_*!` macros keep the configured policy, and for routers the resident
//! catalogue and fleet, in guest statics between calls.
//!
//! # No WASI, please
//!
//! A policy gets exactly one import, [`log`]. The host links Rust std's WASI imports
//! to stubs that trap, so anything reaching for the OS fails the call (and the host
//! falls back to its default policy). Two exceptions answer without granting anything:
//! the environment is empty, and `wasi:random` returns a fixed seeded stream, so
//! `HashMap::new()` works and a policy stays deterministic (never use it for secrets).
//! In practice:
//!
//! - no clocks (`Instant`, `SystemTime`), files, environment, stdout/stderr
//!   (`println!`): use [`log`];
//! - a panic traps the instance; expected failures are [`PolicyError`].

pub mod bindings;
mod convert;
#[doc(hidden)]
pub mod glue;
pub mod log;
pub mod types;

pub use types::*;

/// Chooses where a request runs (the `routing` interface).
pub trait Router: Sized + 'static {
    /// Builds the router from the operator's settings (a JSON object as text; `{}`
    /// when none). Wrong settings are [`PolicyError::BadSettings`].
    fn configure(settings: &str) -> Result<Self, PolicyError>;

    /// Decides where `request` runs, given the resident catalogue and fleet. Resolving
    /// aliases is the router's job.
    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &[CatalogueEntry],
        fleet: &Fleet,
    ) -> Result<Decision, PolicyError>;
}

/// Chooses which resident models to unload to make room (the `eviction` interface).
pub trait Evictor: Sized + 'static {
    /// As [`Router::configure`].
    fn configure(settings: &str) -> Result<Self, PolicyError>;

    /// Returns the ids of models on `on` to unload, in order, so that `need_mb` MiB
    /// become free for `incoming`. An empty list (or one that cannot free enough)
    /// refuses the load.
    fn choose_victims(
        &self,
        on: &Node,
        need_mb: u64,
        incoming: &CatalogueEntry,
    ) -> Result<Vec<String>, PolicyError>;
}

/// Translates between API surfaces (the `translation` interface).
pub trait Translator: Sized + 'static {
    /// The state of one streamed response.
    type Stream: TranslatorStream;

    /// As [`Router::configure`].
    fn configure(settings: &str) -> Result<Self, PolicyError>;

    /// Turns a client body of surface `from` into an OpenAI chat completions request.
    fn request_to_chat(&self, from: Surface, body: &str) -> Result<String, PolicyError>;

    /// Turns a complete chat completion into the body a client of surface `to`
    /// expects; `request` is the client's original body.
    fn response_from_chat(
        &self,
        to: Surface,
        request: &str,
        body: &str,
    ) -> Result<String, PolicyError>;

    /// Starts translating one streamed response.
    fn new_stream(&self, to: Surface, request: &str, response_id: &str) -> Self::Stream;
}

/// The state machine of one streamed response (the `response-stream` resource).
pub trait TranslatorStream: 'static {
    /// Feeds the `data:` of one upstream chat-completion chunk; returns the events to
    /// send now.
    fn push(&mut self, chunk: &str) -> Result<Vec<SseEvent>, PolicyError>;
    /// Events to send while waiting with no upstream data.
    fn keepalive(&mut self) -> Vec<SseEvent>;
    /// The upstream ended; returns the closing events.
    fn finish(&mut self) -> Result<Vec<SseEvent>, PolicyError>;
    /// The upstream failed mid-stream; returns the terminal error events.
    fn fail(&mut self, message: &str) -> Vec<SseEvent>;
}

/// Parses a policy's settings JSON into `T`.
///
/// Empty or whitespace-only text counts as `{}`. Any parse error (including an
/// unknown key, when `T` is `#[serde(deny_unknown_fields)]`) becomes
/// [`PolicyError::BadSettings`] naming the problem.
pub fn parse_settings<T: serde::de::DeserializeOwned>(settings: &str) -> Result<T, PolicyError> {
    let text = if settings.trim().is_empty() {
        "{}"
    } else {
        settings
    };
    serde_json::from_str(text).map_err(|error| PolicyError::BadSettings(error.to_string()))
}

/// Exports a [`Router`] implementation as this component's `routing` interface.
///
/// Call it once, at the crate root of a `cdylib`, under `#[cfg(target_arch = "wasm32")]`.
#[macro_export]
macro_rules! export_router {
    ($router:ty) => {
        const _: () = {
            type HelexaRouterExport = $crate::glue::RouterExport<$router>;
            $crate::bindings::router::export_router_world!(
                HelexaRouterExport with_types_in $crate::bindings::router
            );
        };
    };
}

/// Exports an [`Evictor`] implementation as this component's `eviction` interface.
///
/// Call it once, at the crate root of a `cdylib`, under `#[cfg(target_arch = "wasm32")]`.
#[macro_export]
macro_rules! export_evictor {
    ($evictor:ty) => {
        const _: () = {
            type HelexaEvictorExport = $crate::glue::EvictorExport<$evictor>;
            $crate::bindings::evictor::export_evictor_world!(
                HelexaEvictorExport with_types_in $crate::bindings::evictor
            );
        };
    };
}

/// Exports a [`Translator`] implementation as this component's `translation`
/// interface (its [`Translator::Stream`] becomes the `response-stream` resource).
///
/// Call it once, at the crate root of a `cdylib`, under `#[cfg(target_arch = "wasm32")]`.
#[macro_export]
macro_rules! export_translator {
    ($translator:ty) => {
        const _: () = {
            type HelexaTranslatorExport = $crate::glue::TranslatorExport<$translator>;
            $crate::bindings::translator::export_translator_world!(
                HelexaTranslatorExport with_types_in $crate::bindings::translator
            );
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        #[serde(default)]
        retry_ms: u32,
    }

    #[test]
    fn empty_settings_are_an_empty_object() {
        let settings: Settings = parse_settings("  ").unwrap();
        assert_eq!(settings.retry_ms, 0);
        let settings: Settings = parse_settings(r#"{"retry_ms": 7}"#).unwrap();
        assert_eq!(settings.retry_ms, 7);
    }

    #[test]
    fn unknown_settings_keys_are_bad_settings() {
        let error = parse_settings::<Settings>(r#"{"retry": 7}"#).unwrap_err();
        match error {
            PolicyError::BadSettings(message) => {
                assert!(message.contains("unknown field `retry`"), "{message}")
            }
            other => panic!("expected bad-settings, got {other:?}"),
        }
    }

    #[test]
    fn residency_class_defaults_follow_the_wit_rule() {
        let mut entry = CatalogueEntry {
            id: "m".into(),
            vram_mb: 1,
            ..CatalogueEntry::default()
        };
        assert_eq!(entry.residency_class(), 100);
        entry.pinned_on = vec!["a".into()];
        assert_eq!(entry.residency_class(), 1000);
        entry.residency_priority = Some(5);
        assert_eq!(entry.residency_class(), 5);
    }

    #[test]
    fn decision_json_is_externally_tagged_snake_case() {
        let decision = Decision::RetryAfter(500);
        assert_eq!(
            serde_json::to_string(&decision).unwrap(),
            r#"{"retry_after":500}"#
        );
        let parsed: Decision = serde_json::from_str(
            r#"{"load": {"node": "a", "devices": [0, 1], "free_mb_needed": 10}}"#,
        )
        .unwrap();
        assert_eq!(
            parsed,
            Decision::Load(LoadPlan {
                node: "a".into(),
                devices: vec![0, 1],
                free_mb_needed: 10
            })
        );
    }

    #[test]
    fn case_file_shapes_parse_with_defaults() {
        let node: Node = serde_json::from_str(
            r#"{"name": "a", "health": "healthy",
                "devices": [{"index": 0, "vram_total_mb": 80000, "vram_free_mb": 1000}],
                "models": [{"id": "m", "state": "ready", "vram_mb": 79000}]}"#,
        )
        .unwrap();
        assert_eq!(
            node.models[0].residency_priority,
            DEFAULT_RESIDENCY_PRIORITY
        );
        assert_eq!(node.latency, LatencyStats::default());
        assert!(
            serde_json::from_str::<Node>(r#"{"name": "a", "health": "healthy", "gpu": 1}"#)
                .is_err()
        );
    }
}
