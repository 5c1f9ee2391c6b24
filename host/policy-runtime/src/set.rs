//! The immutable set of active policies, with the fallback to the embedded defaults.

use std::sync::Arc;

use crate::engine::Defaults;
use crate::plugin::{Failure, Plugin, PluginStatus};
use crate::stream::ResponseStream;
use crate::types::{
    Catalogue, CatalogueEntry, Decision, Fleet, Node, PolicyKind, Rejection, RequestInfo, Surface,
};
use crate::{FailPolicy, PolicyError, TranslateError};

/// The message of a request refused because `plugin` failed and its fail policy is
/// `reject`: names the plugin so the client (and operator) know whose rules failed.
fn rejected_by(plugin: &Plugin, failure: &Failure) -> String {
    format!(
        "{} {failure}; its fail policy is `reject`, so this request is refused; retry shortly",
        plugin.label()
    )
}

/// When the default router itself fails, clients are told to retry after this long.
const RETRY_AFTER_DEFAULT_FAILURE_MS: u32 = 1000;

/// The active router, evictor and translator plus the embedded defaults they fall back to.
/// Immutable and cheap to clone; swap whole sets through a [`crate::PolicyHandle`].
#[derive(Clone)]
pub struct PolicySet {
    router: Plugin,
    evictor: Plugin,
    translator: Plugin,
    defaults: Arc<Defaults>,
}

impl std::fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySet")
            .field("router", &self.router)
            .field("evictor", &self.evictor)
            .field("translator", &self.translator)
            .finish_non_exhaustive()
    }
}

impl PolicySet {
    pub(crate) fn from_defaults(defaults: Defaults) -> Self {
        PolicySet {
            router: defaults.router.clone(),
            evictor: defaults.evictor.clone(),
            translator: defaults.translator.clone(),
            defaults: Arc::new(defaults),
        }
    }

    /// A new set with `plugin` replacing the active plugin of its kind.
    pub fn with(&self, plugin: Plugin) -> PolicySet {
        let mut set = self.clone();
        match plugin.kind() {
            PolicyKind::Router => set.router = plugin,
            PolicyKind::Evictor => set.evictor = plugin,
            PolicyKind::Translator => set.translator = plugin,
        }
        set
    }

    /// The active plugin of `kind`.
    pub fn plugin(&self, kind: PolicyKind) -> &Plugin {
        match kind {
            PolicyKind::Router => &self.router,
            PolicyKind::Evictor => &self.evictor,
            PolicyKind::Translator => &self.translator,
        }
    }

    /// Decide where `request` runs. Never fails: a trap, timeout or error of the active
    /// router is counted and logged and the default router answers instead; if that fails
    /// too the answer is a 503 rejection with a retry hint. Blocking for at most about two
    /// call deadlines; microseconds in the normal case.
    pub fn route(
        &self,
        request: &RequestInfo,
        catalogue: &Arc<Catalogue>,
        fleet: &Arc<Fleet>,
    ) -> Decision {
        let route = |plugin: &Plugin| plugin.route(request, catalogue, fleet);
        if self.router.on_failure() == FailPolicy::Reject {
            return route(&self.router).unwrap_or_else(|failure| {
                Decision::Reject(Rejection {
                    status: 503,
                    message: rejected_by(&self.router, &failure),
                    retry_after_ms: Some(RETRY_AFTER_DEFAULT_FAILURE_MS),
                })
            });
        }
        match self.with_fallback(&self.router, &self.defaults.router, "route", route) {
            Ok(decision) => decision,
            Err(failure) => Decision::Reject(Rejection {
                status: 503,
                message: format!("no routing decision could be made ({failure}); retry shortly"),
                retry_after_ms: Some(RETRY_AFTER_DEFAULT_FAILURE_MS),
            }),
        }
    }

    /// The resident models to unload from `on`, in order, so that `incoming` (needing
    /// `need_mb` MiB) can load. Never fails: on failure of the active evictor the default
    /// decides; if that fails too the list is empty (the load is refused).
    pub fn choose_victims(
        &self,
        on: &Node,
        need_mb: u64,
        incoming: &CatalogueEntry,
    ) -> Vec<String> {
        let choose = |plugin: &Plugin| plugin.choose_victims(on, need_mb, incoming);
        if self.evictor.on_failure() == FailPolicy::Reject {
            // No victims: the load is refused and the request answered accordingly.
            return choose(&self.evictor).unwrap_or_default();
        }
        self.with_fallback(
            &self.evictor,
            &self.defaults.evictor,
            "choose-victims",
            choose,
        )
        .unwrap_or_default()
    }

    /// Translate a client request body of surface `from` into an OpenAI chat completions
    /// request body.
    pub fn request_to_chat(&self, from: Surface, body: &str) -> Result<String, TranslateError> {
        let translate = |plugin: &Plugin| plugin.request_to_chat(from, body);
        self.translate(translate, "request-to-chat")
    }

    /// Translate a complete chat completion response into the body a client of surface
    /// `to` expects; `request` is the client's original body.
    pub fn response_from_chat(
        &self,
        to: Surface,
        request: &str,
        body: &str,
    ) -> Result<String, TranslateError> {
        let translate = |plugin: &Plugin| plugin.response_from_chat(to, request, body);
        self.translate(translate, "response-from-chat")
    }

    /// Start translating a streamed response for a client of surface `to`. The stream owns
    /// a translator instance until it is dropped.
    pub fn response_stream(
        &self,
        to: Surface,
        request: &str,
        response_id: &str,
    ) -> Result<ResponseStream, TranslateError> {
        ResponseStream::start(
            &self.translator,
            &self.defaults.translator,
            to,
            request,
            response_id,
        )
    }

    /// Identity and counters of the active plugins (router, evictor, translator), followed
    /// by the defaults that are not active.
    pub fn describe(&self) -> Vec<PluginStatus> {
        let active = [&self.router, &self.evictor, &self.translator];
        let defaults = [
            &self.defaults.router,
            &self.defaults.evictor,
            &self.defaults.translator,
        ];
        let mut out: Vec<PluginStatus> = active.iter().map(|p| p.status()).collect();
        out.extend(
            defaults
                .iter()
                .filter(|d| !active.iter().any(|a| a.same(d)))
                .map(|d| d.status()),
        );
        out
    }

    fn translate(
        &self,
        translate: impl Fn(&Plugin) -> Result<String, Failure>,
        op: &str,
    ) -> Result<String, TranslateError> {
        let start = std::time::Instant::now();
        // A client's malformed body is answered as such, never retried on the default.
        let first = match translate(&self.translator) {
            Err(Failure::Error(PolicyError::InvalidInput(m))) => {
                return Err(TranslateError::InvalidInput(m));
            }
            other => other,
        };
        let answer = match first {
            Ok(body) => return Ok(body),
            Err(failure) if self.translator.is_default() => Err(failure),
            Err(failure) if self.translator.on_failure() == FailPolicy::Reject => {
                return Err(TranslateError::Unavailable(rejected_by(
                    &self.translator,
                    &failure,
                )));
            }
            Err(_) => {
                let answer = translate(&self.defaults.translator);
                if answer.is_ok() {
                    self.defaults.translator.record_fallback(start.elapsed());
                }
                answer
            }
        };
        answer.map_err(|failure| match failure {
            Failure::Error(PolicyError::InvalidInput(m)) => TranslateError::InvalidInput(m),
            failure => TranslateError::Failed(format!("{op}: the translator {failure}")),
        })
    }

    /// Run `call` on `active`; on any failure of a non-default plugin run it on `default`.
    fn with_fallback<R>(
        &self,
        active: &Plugin,
        default: &Plugin,
        _op: &str,
        call: impl Fn(&Plugin) -> Result<R, Failure>,
    ) -> Result<R, Failure> {
        let start = std::time::Instant::now();
        match call(active) {
            Ok(answer) => Ok(answer),
            Err(failure) if active.is_default() => Err(failure),
            Err(_) => {
                let answer = call(default);
                if answer.is_ok() {
                    default.record_fallback(start.elapsed());
                }
                answer
            }
        }
    }
}
