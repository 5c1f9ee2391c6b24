//! The streaming proxy: node responses go to the client as they arrive.
//!
//! Passthrough surfaces relay the node's bytes unchanged (no buffering). Translated
//! surfaces parse the node's SSE, feed each `data:` payload to the translator's stream
//! and write the events it returns. Either way a node that dies or stalls mid-stream
//! (the stall timeout is a per-read timeout of the HTTP client, so it bounds silence,
//! not the response's length; it applies to streamed requests only — a non-streamed
//! generation is silent until it is complete, and the node's own limits bound it) ends the client's stream with a terminal error event —
//! never a hang — and a client that goes away drops the node request, which makes the
//! node cancel generation.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde_json::json;

use crate::config::ProxyConfig;
use crate::fleet::FleetState;
use crate::metrics::Metrics;
use crate::policy::{EventStream, SseEvent};

/// The HTTP clients towards nodes.
#[derive(Debug)]
pub struct Proxy {
    /// Streamed generation: no total timeout (streams are long), a read timeout as
    /// stall detector.
    data: reqwest::Client,
    /// Non-streamed generation and tokenize: no read timeout, since the node sends
    /// nothing until the whole answer is ready (which may take minutes); the node's
    /// `max_tokens` and context limits bound how long that is.
    unary: reqwest::Client,
    /// Load and unload: a total timeout sized for downloads.
    control: reqwest::Client,
}

impl Proxy {
    /// Build the clients (`TCP_NODELAY`, keep-alive pools).
    pub fn new(config: &ProxyConfig) -> reqwest::Result<Proxy> {
        let data = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.stall_timeout)
            .build()?;
        let unary = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .connect_timeout(config.connect_timeout)
            .build()?;
        let control = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .timeout(config.load_timeout)
            .build()?;
        Ok(Proxy {
            data,
            unary,
            control,
        })
    }

    /// `POST {endpoint}{path}` with a JSON body; resolves when the node's headers arrive.
    /// `stream` picks the client: only streamed answers are cut by the stall timeout.
    pub async fn forward(
        &self,
        endpoint: &str,
        path: &str,
        body: Bytes,
        stream: bool,
    ) -> reqwest::Result<reqwest::Response> {
        let client = if stream { &self.data } else { &self.unary };
        client
            .post(format!("{endpoint}{path}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
    }

    /// `POST {endpoint}{path}` of a control call (load, unload).
    pub async fn control(
        &self,
        endpoint: &str,
        path: &str,
        body: &impl serde::Serialize,
    ) -> reqwest::Result<reqwest::Response> {
        self.control
            .post(format!("{endpoint}{path}"))
            .json(body)
            .send()
            .await
    }
}

/// Watches a node's body go by: time to first byte, gaps between chunks, token usage.
/// Records everything once, when the stream ends or is dropped (client gone).
pub struct Observer {
    metrics: Metrics,
    fleet: Arc<FleetState>,
    node: String,
    surface: &'static str,
    started: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    gaps: u32,
    gap_total: Duration,
    /// The last few KiB of the body: usage is reported at its end.
    tail: Vec<u8>,
}

const TAIL_BYTES: usize = 4096;

impl Observer {
    /// Start observing a response of `node` to a request that arrived at `started`.
    pub fn new(
        metrics: Metrics,
        fleet: Arc<FleetState>,
        node: String,
        surface: &'static str,
        started: Instant,
    ) -> Observer {
        Observer {
            metrics,
            fleet,
            node,
            surface,
            started,
            first: None,
            last: None,
            gaps: 0,
            gap_total: Duration::ZERO,
            tail: Vec::new(),
        }
    }

    /// One chunk arrived.
    pub fn chunk(&mut self, bytes: &[u8]) {
        let now = Instant::now();
        match self.last {
            None => {
                self.first = Some(now);
                self.metrics
                    .ttft
                    .with_label_values(&[self.surface])
                    .observe((now - self.started).as_secs_f64());
            }
            Some(last) => {
                let gap = now - last;
                self.metrics.inter_token.observe(gap.as_secs_f64());
                self.gaps += 1;
                self.gap_total += gap;
            }
        }
        self.last = Some(now);
        if bytes.len() >= TAIL_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&bytes[bytes.len() - TAIL_BYTES..]);
        } else {
            let excess = (self.tail.len() + bytes.len()).saturating_sub(TAIL_BYTES);
            self.tail.drain(..excess);
            self.tail.extend_from_slice(bytes);
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(first) = self.first {
            let ttft_ms = (first - self.started).as_secs_f32() * 1000.0;
            let itl_ms = if self.gaps > 0 {
                self.gap_total.as_secs_f32() * 1000.0 / self.gaps as f32
            } else {
                0.0
            };
            if let Some(node) = self.fleet.node(&self.node) {
                node.record_latency(ttft_ms, itl_ms);
            }
        }
        if let Some((prompt, completion)) = scan_usage(&self.tail) {
            self.metrics
                .tokens
                .with_label_values(&["prompt"])
                .inc_by(prompt);
            self.metrics
                .tokens
                .with_label_values(&["completion"])
                .inc_by(completion);
        }
    }
}

/// The last `"prompt_tokens": N` and `"completion_tokens": N` in `tail` (OpenAI usage),
/// found without parsing the whole body.
pub fn scan_usage(tail: &[u8]) -> Option<(u64, u64)> {
    fn last_number(haystack: &[u8], key: &[u8]) -> Option<u64> {
        let at = haystack.windows(key.len()).rposition(|w| w == key)?;
        let rest = &haystack[at + key.len()..];
        let rest = rest
            .iter()
            .skip_while(|b| b.is_ascii_whitespace() || **b == b':');
        let digits: String = rest
            .take_while(|b| b.is_ascii_digit())
            .map(|b| char::from(*b))
            .collect();
        digits.parse().ok()
    }
    Some((
        last_number(tail, b"\"prompt_tokens\"")?,
        last_number(tail, b"\"completion_tokens\"")?,
    ))
}

type ByteStream = BoxStream<'static, reqwest::Result<Bytes>>;

/// The OpenAI terminal error event for a broken passthrough stream, then `[DONE]`.
pub fn openai_stream_error(message: &str) -> Bytes {
    let error = json!({"error": {
        "message": message, "type": "server_error", "code": "upstream_stream_error", "param": null
    }});
    Bytes::from(format!("data: {error}\n\ndata: [DONE]\n\n"))
}

/// Relay a node's body unchanged. If it breaks mid-way, an SSE body gets the OpenAI
/// terminal error event; any other body is cut (the client sees a broken connection
/// rather than truncated JSON that looks whole).
pub fn relay(response: reqwest::Response, observer: Observer, sse: bool) -> Body {
    struct State {
        upstream: ByteStream,
        observer: Observer,
        sse: bool,
        done: bool,
    }
    let state = State {
        upstream: response.bytes_stream().boxed(),
        observer,
        sse,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        match s.upstream.next().await {
            Some(Ok(bytes)) => {
                s.observer.chunk(&bytes);
                Some((Ok(bytes), s))
            }
            Some(Err(e)) => {
                s.done = true;
                s.observer
                    .metrics
                    .errors
                    .with_label_values(&[s.observer.surface, "stream"])
                    .inc();
                tracing::warn!(node = %s.observer.node, error = %e, "node stream broke");
                if s.sse {
                    let message = format!("the node stopped responding mid-stream: {e}");
                    Some((Ok(openai_stream_error(&message)), s))
                } else {
                    Some((Err(std::io::Error::other(e)), s))
                }
            }
            None => None,
        }
    });
    Body::from_stream(stream)
}

/// Incremental SSE parser: bytes in, complete `data:` payloads out.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: BytesMut,
    data: Vec<String>,
}

impl SseParser {
    /// Feed bytes; returns the payloads of the events they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(newline) = self.buffer.iter().position(|b| *b == b'\n') {
            let line = self.buffer.split_to(newline + 1);
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            self.line(line, &mut out);
        }
        out
    }

    /// The stream ended: an event left without its blank line still counts.
    pub fn end(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.buffer.is_empty() {
            let rest = self.buffer.split();
            let rest = rest.strip_suffix(b"\r").unwrap_or(&rest);
            self.line(rest, &mut out);
        }
        self.line(b"", &mut out);
        out
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<String>) {
        if line.is_empty() {
            if !self.data.is_empty() {
                out.push(self.data.join("\n"));
                self.data.clear();
            }
        } else if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            self.data.push(String::from_utf8_lossy(value).into_owned());
        }
        // `event:`, `id:`, `retry:` and comments carry nothing the translator needs.
    }
}

/// Encode events for the client.
pub fn encode_events(events: &[SseEvent]) -> Bytes {
    let mut out = String::new();
    for event in events {
        if let Some(name) = &event.event {
            out.push_str("event: ");
            out.push_str(name);
            out.push('\n');
        }
        for line in event.data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    Bytes::from(out)
}

/// Where a translated stream's bytes come from: a node that has answered already, or
/// one still being chosen / loaded (the client gets keep-alive events meanwhile).
pub enum Upstream {
    /// The node's response (2xx) and its observer.
    Ready(Box<(reqwest::Response, Observer)>),
    /// Routing still in progress; resolves to the node's response or a client message.
    Pending(BoxFuture<'static, Result<(reqwest::Response, Observer), String>>),
}

/// Stream a node's chat SSE through a translator stream to the client, with keep-alive
/// events after `keepalive` of silence (also while the upstream is still pending).
pub fn translate(
    upstream: Upstream,
    translator: Box<dyn EventStream>,
    keepalive: Duration,
    metrics: Metrics,
    surface: &'static str,
) -> Body {
    struct State {
        pending: Option<BoxFuture<'static, Result<(reqwest::Response, Observer), String>>>,
        upstream: Option<(ByteStream, Observer)>,
        translator: Box<dyn EventStream>,
        parser: SseParser,
        keepalive: Duration,
        metrics: Metrics,
        surface: &'static str,
        done: bool,
    }
    let (pending, upstream) = match upstream {
        Upstream::Ready(ready) => {
            let (response, observer) = *ready;
            (None, Some((response.bytes_stream().boxed(), observer)))
        }
        Upstream::Pending(future) => (Some(future), None),
    };
    let state = State {
        pending,
        upstream,
        translator,
        parser: SseParser::default(),
        keepalive,
        metrics,
        surface,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            let events = if let Some(pending) = s.pending.as_mut() {
                match tokio::time::timeout(s.keepalive, pending).await {
                    Err(_) => match s.translator.keepalive() {
                        events if events.is_empty() => return Some((Ok(keepalive_comment()), s)),
                        events => events,
                    },
                    Ok(Ok((response, observer))) => {
                        s.pending = None;
                        s.upstream = Some((response.bytes_stream().boxed(), observer));
                        Vec::new()
                    }
                    Ok(Err(message)) => {
                        s.pending = None;
                        s.fail(&message)
                    }
                }
            } else if let Some((upstream, observer)) = s.upstream.as_mut() {
                match tokio::time::timeout(s.keepalive, upstream.next()).await {
                    Err(_) => match s.translator.keepalive() {
                        events if events.is_empty() => return Some((Ok(keepalive_comment()), s)),
                        events => events,
                    },
                    Ok(Some(Ok(bytes))) => {
                        observer.chunk(&bytes);
                        let payloads = s.parser.feed(&bytes);
                        s.feed(payloads)
                    }
                    Ok(Some(Err(e))) => {
                        tracing::warn!(node = %observer.node, error = %e, "node stream broke");
                        s.fail(&format!("the node stopped responding mid-stream: {e}"))
                    }
                    Ok(None) => {
                        let payloads = s.parser.end();
                        let mut events = s.feed(payloads);
                        if !s.done {
                            // No `[DONE]`: the node closed cleanly; let the translator close too.
                            s.done = true;
                            match s.translator.finish() {
                                Ok(more) => events.extend(more),
                                Err(e) => events.extend(s.translator.fail(&e.to_string())),
                            }
                        }
                        events
                    }
                }
            } else {
                return None;
            };
            if !events.is_empty() {
                return Some((Ok::<Bytes, Infallible>(encode_events(&events)), s));
            }
        }
    });

    impl State {
        fn feed(&mut self, payloads: Vec<String>) -> Vec<SseEvent> {
            let mut events = Vec::new();
            for payload in payloads {
                if self.done {
                    break;
                }
                if payload.trim() == "[DONE]" {
                    self.done = true;
                    match self.translator.finish() {
                        Ok(more) => events.extend(more),
                        Err(e) => events.extend(self.translator.fail(&e.to_string())),
                    }
                    continue;
                }
                // The node reports a failure inside the stream as an error object.
                if let Some(message) = stream_error_message(&payload) {
                    events.extend(self.fail(&message));
                    continue;
                }
                match self.translator.push(&payload) {
                    Ok(more) => events.extend(more),
                    Err(e) => events.extend(self.fail(&e.to_string())),
                }
            }
            events
        }

        fn fail(&mut self, message: &str) -> Vec<SseEvent> {
            self.done = true;
            self.metrics
                .errors
                .with_label_values(&[self.surface, "stream"])
                .inc();
            self.translator.fail(message)
        }
    }

    Body::from_stream(stream)
}

/// An SSE comment: every client ignores it, but it keeps proxies and idle timers from
/// closing a silent stream when the translator has no keep-alive event of its own (an
/// Anthropic `ping` only follows `message_start`).
fn keepalive_comment() -> Bytes {
    Bytes::from_static(b": keepalive\n\n")
}

/// `Some(message)` when an SSE payload is `{"error": ...}`.
fn stream_error_message(payload: &str) -> Option<String> {
    if !payload.trim_start().starts_with("{\"error\"") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(payload).ok()?;
    let error = value.get("error")?;
    Some(
        error
            .get("message")
            .and_then(|m| m.as_str())
            .map_or_else(|| error.to_string(), str::to_owned),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_lines_and_crlf() {
        let mut p = SseParser::default();
        assert!(p.feed(b"data: {\"a\"").is_empty());
        assert_eq!(
            p.feed(b":1}\r\n\r\ndata: x\n"),
            vec!["{\"a\":1}".to_owned()]
        );
        assert_eq!(p.feed(b"data: y\n\n: comment\n\n"), vec!["x\ny".to_owned()]);
        assert_eq!(p.feed(b"data: [DONE]"), Vec::<String>::new());
        assert_eq!(p.end(), vec!["[DONE]".to_owned()]);
    }

    #[test]
    fn usage_is_found_in_the_tail() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens": 12,"completion_tokens":34,"total_tokens":46}}"#;
        assert_eq!(scan_usage(body), Some((12, 34)));
        assert_eq!(scan_usage(b"{}"), None);
    }

    #[test]
    fn events_encode_with_names_and_multiline_data() {
        let events = vec![
            SseEvent {
                event: Some("ping".into()),
                data: "{}".into(),
            },
            SseEvent {
                event: None,
                data: "a\nb".into(),
            },
        ];
        assert_eq!(
            &encode_events(&events)[..],
            b"event: ping\ndata: {}\n\ndata: a\ndata: b\n\n"
        );
    }

    #[test]
    fn stream_error_payload_is_recognised() {
        assert_eq!(
            stream_error_message(r#"{"error":{"message":"boom","type":"server_error"}}"#),
            Some("boom".to_owned())
        );
        assert_eq!(stream_error_message(r#"{"choices":[]}"#), None);
    }
}
