//! Translation of one streamed response: a `response-stream` resource living in a
//! translator instance that the stream owns (out of the pool) until it is dropped.
//!
//! A stream cannot change translators midway (the state machine is in the guest), so a
//! fault mid-stream ends it: the client gets terminal error events, produced by the
//! translator's own `fail` after a `policy-error`, or by a fresh stream of the default
//! translator after a trap or timeout (the faulted instance is gone).

use std::time::Instant;

use wasmtime::component::ResourceAny;

use crate::plugin::{Failure, Instance, Plugin, classify};
use crate::types::{SseEvent, Surface};
use crate::{PolicyError, TranslateError};

/// What the client is told when the translator breaks mid-stream (details go to the log).
const MID_STREAM_FAILURE: &str = "the response could not be translated";

/// A streamed response being translated. `Send`; owns its translator instance until
/// dropped.
///
/// After a failure (or `finish`/`fail`) the stream has ended: it has already returned its
/// terminal events, and further calls return no events.
pub struct ResponseStream {
    to: Surface,
    request: String,
    response_id: String,
    default: Plugin,
    live: Option<Live>,
}

struct Live {
    plugin: Plugin,
    instance: Instance,
    resource: ResourceAny,
}

impl std::fmt::Debug for ResponseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStream")
            .field("to", &self.to)
            .field("response_id", &self.response_id)
            .field("ended", &self.live.is_none())
            .finish_non_exhaustive()
    }
}

impl ResponseStream {
    pub(crate) fn start(
        active: &Plugin,
        default: &Plugin,
        to: Surface,
        request: &str,
        response_id: &str,
    ) -> Result<Self, TranslateError> {
        let started = std::time::Instant::now();
        let live = match open(active, to, request, response_id) {
            Ok(live) => live,
            Err(failure) if active.is_default() => return Err(start_error(failure)),
            Err(failure) if active.on_failure() == crate::FailPolicy::Reject => {
                return Err(TranslateError::Unavailable(format!(
                    "{} {failure}; its fail policy is `reject`, so this request is refused; retry shortly",
                    active.label()
                )));
            }
            Err(_) => {
                let live = open(default, to, request, response_id).map_err(start_error)?;
                default.record_fallback(started.elapsed());
                live
            }
        };
        Ok(ResponseStream {
            to,
            request: request.to_owned(),
            response_id: response_id.to_owned(),
            default: default.clone(),
            live: Some(live),
        })
    }

    /// Whether the stream has ended (finished, failed, or broke and returned its terminal
    /// events).
    pub fn is_ended(&self) -> bool {
        self.live.is_none()
    }

    /// Feed the `data:` of one upstream chat-completion chunk; returns the events to send
    /// now. A translator fault ends the stream and returns terminal error events instead;
    /// `Err` only when even those could not be produced.
    pub fn push(&mut self, chunk: &str) -> Result<Vec<SseEvent>, TranslateError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(Vec::new());
        };
        let start = Instant::now();
        let result = live.instance.stream_push(live.resource, chunk);
        match self.settle("stream push", result, start) {
            Ok(events) => Ok(events),
            Err(failure) => self.break_off(failure),
        }
    }

    /// Events to send while no upstream data arrives (Anthropic `ping`).
    pub fn keepalive(&mut self) -> Vec<SseEvent> {
        let Some(live) = self.live.as_mut() else {
            return Vec::new();
        };
        let start = Instant::now();
        let result = live.instance.stream_keepalive(live.resource).map(Ok);
        match self.settle("stream keepalive", result, start) {
            Ok(events) => events,
            Err(failure) => self.break_off(failure).unwrap_or_default(),
        }
    }

    /// The upstream ended; returns the closing events and ends the stream.
    pub fn finish(&mut self) -> Result<Vec<SseEvent>, TranslateError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(Vec::new());
        };
        let start = Instant::now();
        let result = live.instance.stream_finish(live.resource);
        match self.settle("stream finish", result, start) {
            Ok(events) => {
                self.close();
                Ok(events)
            }
            Err(failure) => self.break_off(failure),
        }
    }

    /// The upstream failed mid-stream; returns the terminal error events and ends the
    /// stream.
    pub fn fail(&mut self, message: &str) -> Vec<SseEvent> {
        let Some(live) = self.live.as_mut() else {
            return Vec::new();
        };
        let start = Instant::now();
        let result = live.instance.stream_fail(live.resource, message).map(Ok);
        match self.settle("stream fail", result, start) {
            Ok(events) => {
                self.close();
                events
            }
            Err(_) => {
                // The instance trapped and is gone: the default translator says it instead.
                self.live = None;
                self.default_fail(message).unwrap_or_default()
            }
        }
    }

    /// Count a stream call; on a trap, discard the instance (it cannot be called again).
    fn settle(
        &mut self,
        op: &str,
        result: wasmtime::Result<Result<Vec<SseEvent>, PolicyError>>,
        start: Instant,
    ) -> Result<Vec<SseEvent>, Failure> {
        let Some(live) = self.live.as_ref() else {
            return Err(Failure::Trap("stream already ended".into()));
        };
        let plugin = live.plugin.clone();
        let result = match result {
            Ok(Ok(events)) => Ok(events),
            Ok(Err(error)) => Err(Failure::Error(error)),
            Err(e) => {
                self.live = None; // drops the trapped instance
                Err(classify(e, plugin.call_deadline()))
            }
        };
        plugin.record(op, result.as_ref().map(drop), start.elapsed());
        result
    }

    /// End the stream after a fault, returning terminal events: the translator's own
    /// `fail` if its instance is still usable, otherwise the default translator's.
    fn break_off(&mut self, failure: Failure) -> Result<Vec<SseEvent>, TranslateError> {
        if let Some(live) = self.live.as_mut() {
            // A `policy-error`: the instance is healthy, let its own state machine close.
            let start = Instant::now();
            let result = live
                .instance
                .stream_fail(live.resource, MID_STREAM_FAILURE)
                .map(Ok);
            if let Ok(events) = self.settle("stream fail", result, start) {
                self.close();
                return Ok(events);
            }
        }
        self.live = None;
        self.default_fail(MID_STREAM_FAILURE)
            .map_err(|default_failure| {
                TranslateError::Failed(format!(
                    "translator {failure} mid-stream, and the default translator {default_failure}"
                ))
            })
    }

    /// Terminal events for this stream from a fresh stream of the default translator.
    fn default_fail(&self, message: &str) -> Result<Vec<SseEvent>, Failure> {
        let mut live = open(&self.default, self.to, &self.request, &self.response_id)?;
        let start = Instant::now();
        let events = live.instance.stream_fail(live.resource, message);
        let events = match events {
            Ok(events) => events,
            Err(e) => {
                let failure = classify(e, self.default.call_deadline());
                self.default
                    .record("stream fail", Err(&failure), start.elapsed());
                return Err(failure);
            }
        };
        self.default.record("stream fail", Ok(()), start.elapsed());
        self.default.record_fallback(start.elapsed());
        live.close();
        Ok(events)
    }

    /// End normally: drop the resource and return the instance to its pool.
    fn close(&mut self) {
        if let Some(live) = self.live.take() {
            live.close();
        }
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        self.close();
    }
}

impl Live {
    fn close(mut self) {
        // The guest's destructor runs here; an instance whose destructor traps is dropped
        // rather than pooled.
        if self.instance.stream_drop(self.resource).is_ok() {
            self.plugin.checkin(self.instance);
        }
    }
}

/// Check out an instance of `plugin` and construct a stream resource in it.
fn open(plugin: &Plugin, to: Surface, request: &str, response_id: &str) -> Result<Live, Failure> {
    let start = Instant::now();
    let result = plugin.checkout().and_then(|mut instance| {
        match instance.stream_new(to, request, response_id) {
            Ok(resource) => Ok(Live {
                plugin: plugin.clone(),
                instance,
                resource,
            }),
            Err(e) => Err(classify(e, plugin.call_deadline())),
        }
    });
    plugin.record("stream start", result.as_ref().map(drop), start.elapsed());
    result
}

fn start_error(failure: Failure) -> TranslateError {
    TranslateError::Failed(format!(
        "starting a response stream: the translator {failure}"
    ))
}
