//! The gateway's seam to its policies (router, evictor, translator).
//!
//! Production runs the WASM policies of `helexa-policy-runtime` ([`RuntimePolicies`]: its
//! `PolicySet` behind a hot-swappable handle); tests substitute scripted policies to drive every branch of
//! the routing path (serve with fallbacks, load, retry-after, reject) deterministically.
//! Everything else in the gateway only sees the [`Policies`] trait.

use std::sync::Arc;

mod plugins;
mod runtime;

pub use helexa_policy_runtime::TranslateError;
pub use helexa_policy_runtime::types::*;
pub use plugins::{PluginManager, ReloadReport, WorldStatus};
pub(crate) use runtime::default_cache_dir;
pub use runtime::{PolicyLoadError, RuntimePolicies, load};

/// The policies the gateway consults on every request. Implementations must be cheap to
/// call from async code: router and evictor calls are bounded to a few ms by the runtime.
pub trait Policies: Send + Sync + 'static {
    /// Decide where a request goes. Never fails (a faulty plugin falls back to a default).
    fn route(
        &self,
        request: &RequestInfo,
        catalogue: &Arc<Catalogue>,
        fleet: &Arc<Fleet>,
    ) -> Decision;
    /// Which resident models to unload from `on` to free `need_mb` for `incoming`, in order.
    fn choose_victims(&self, on: &Node, need_mb: u64, incoming: &CatalogueEntry) -> Vec<String>;
    /// Translate a client body of surface `from` into an OpenAI chat request body.
    fn request_to_chat(&self, from: Surface, body: &str) -> Result<String, TranslateError>;
    /// Translate a (non-streamed) OpenAI chat response into surface `to`'s response.
    fn response_from_chat(
        &self,
        to: Surface,
        request: &str,
        body: &str,
    ) -> Result<String, TranslateError>;
    /// A stream translator from OpenAI chat chunks to surface `to`'s events.
    fn response_stream(
        &self,
        to: Surface,
        request: &str,
        response_id: &str,
    ) -> Result<Box<dyn EventStream>, TranslateError>;
    /// A description of the active policies for `GET /health`.
    fn describe(&self) -> serde_json::Value;
    /// Hot reload state for `GET /health` (per world: live plugin, last reload); `null`
    /// when the policies are not reloadable.
    fn plugins_health(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// One translated response stream (OpenAI chat chunks in, surface events out).
pub trait EventStream: Send {
    /// Feed one `data:` payload of the node's stream.
    fn push(&mut self, chunk: &str) -> Result<Vec<SseEvent>, TranslateError>;
    /// Events to send while the node is silent (an Anthropic `ping`), possibly none.
    fn keepalive(&mut self) -> Vec<SseEvent>;
    /// The node's stream ended normally (`[DONE]`).
    fn finish(&mut self) -> Result<Vec<SseEvent>, TranslateError>;
    /// The node's stream broke: the terminal events that tell the client so.
    fn fail(&mut self, message: &str) -> Vec<SseEvent>;
}

/// Resolve a client's model name (id or alias) to its catalogue entry.
pub fn find_entry<'a>(catalogue: &'a Catalogue, model: &str) -> Option<&'a CatalogueEntry> {
    catalogue
        .entries
        .iter()
        .find(|e| e.id == model)
        .or_else(|| {
            catalogue
                .entries
                .iter()
                .find(|e| e.aliases.iter().any(|a| a == model))
        })
}
