//! `POST /v1/chat/completions` and `POST /v1/completions`: OpenAI request validation, the
//! generation driver (engine on a blocking thread → tokens over a channel → detokenizer → stop
//! strings → output parser), and OpenAI's exact response and SSE chunk shapes.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use helexa_engine_abi::Flow;
use helexa_engine_abi::json::{Finish, GenerateParams, GenerateSummary, Sampling};
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};
use tokio::sync::mpsc;

use crate::backend::BackendError;
use crate::error_http::ApiError;
use crate::output::{Event, OutputParser, StopMatcher};
use crate::state::{AppState, Model, Permit};
use crate::template::RenderInput;

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// vLLM's extension: every chunk carries `usage` with the running counts, so a client
    /// knows the prompt size from the first chunk on (the Anthropic translator needs it for
    /// `message_start`).
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

impl StreamOptions {
    /// `(include_usage, continuous_usage_stats)` of a request's options.
    fn flags(options: Option<&Self>) -> (bool, bool) {
        options.map_or((false, false), |o| {
            (
                o.include_usage.unwrap_or(false),
                o.continuous_usage_stats.unwrap_or(false),
            )
        })
    }
}

/// Fields shared by both generation routes. Unknown fields are ignored, as OpenAI clients send
/// many the node has no use for (`user`, `metadata`, …).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// Model id.
    pub model: String,
    /// Stream SSE chunks.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Token limit (legacy name).
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Token limit (current name; wins over `max_tokens`).
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<StopField>,
    /// Sampling temperature, 0–2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Min-p.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Repetition penalty.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Presence penalty, −2–2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty, −2–2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// RNG seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Number of choices (only 1).
    #[serde(default)]
    pub n: Option<u32>,
    /// Log probabilities are not supported.
    #[serde(default)]
    pub logprobs: Option<Json>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Shared parameters.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Conversation.
    pub messages: Vec<Json>,
    /// Tool definitions.
    #[serde(default)]
    pub tools: Option<Vec<Json>>,
    /// `auto` (default), `none` (no tools), `required` (some tool call), or
    /// `{"type": "function", "function": {"name": …}}` (that tool); see [`ToolChoice`].
    #[serde(default)]
    pub tool_choice: Option<Json>,
    /// Extra template variables (`enable_thinking`).
    #[serde(default)]
    pub chat_template_kwargs: Option<Map<String, Json>>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Shared parameters.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Text, one-element list of text, or token ids.
    pub prompt: Json,
    /// Echo is not supported.
    #[serde(default)]
    pub echo: Option<bool>,
}

/// Usage numbers of one generation.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    prompt: u32,
    cached: u32,
    completion: u32,
    reasoning: u32,
}

impl Usage {
    fn to_json(self) -> Json {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        })
    }
}

/// How generated text is interpreted.
enum Parse {
    /// Chat: reasoning and tool calls are extracted.
    Chat(Box<OutputParser>),
    /// Completions: raw text.
    Raw,
}

/// Everything a generation needs, prepared (and validated) before the response starts.
struct Prepared {
    model: Arc<Model>,
    prompt: Vec<u32>,
    params: GenerateParams,
    stops: Vec<String>,
    parse: Parse,
    stream: bool,
    include_usage: bool,
    /// Every streamed chunk carries the running usage.
    continuous_usage: bool,
}

/// OpenAI's limit on the number of stop strings.
const MAX_STOPS: usize = 4;
/// Longest stop string accepted: the stop matcher holds back up to this much text.
const MAX_STOP_BYTES: usize = 256;

fn validate_common(common: &CommonParams) -> Result<(), ApiError> {
    if common.model.trim().is_empty() {
        return Err(ApiError::bad_param("model", "`model` is required"));
    }
    if let Some(n) = common.n
        && n != 1
    {
        return Err(ApiError::bad_param("n", "only `n: 1` is supported"));
    }
    if common
        .logprobs
        .as_ref()
        .is_some_and(|v| !v.is_null() && v != &Json::Bool(false))
    {
        return Err(ApiError::bad_param(
            "logprobs",
            "`logprobs` is not supported",
        ));
    }
    if let Some(t) = common.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::bad_param(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {t}"),
        ));
    }
    if let Some(p) = common.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::bad_param(
            "top_p",
            format!("`top_p` must be in (0, 1], got {p}"),
        ));
    }
    if let Some(k) = common.top_k
        && k < -1
    {
        return Err(ApiError::bad_param(
            "top_k",
            format!("`top_k` must be -1 (disabled), 0 (disabled) or positive, got {k}"),
        ));
    }
    if let Some(p) = common.min_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(ApiError::bad_param(
            "min_p",
            format!("`min_p` must be in [0, 1], got {p}"),
        ));
    }
    if let Some(r) = common.repetition_penalty
        && !(r > 0.0 && r.is_finite())
    {
        return Err(ApiError::bad_param(
            "repetition_penalty",
            format!("`repetition_penalty` must be positive, got {r}"),
        ));
    }
    for (name, value) in [
        ("presence_penalty", common.presence_penalty),
        ("frequency_penalty", common.frequency_penalty),
    ] {
        if let Some(v) = value
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(ApiError::bad_param(
                name,
                format!("`{name}` must be between -2 and 2, got {v}"),
            ));
        }
    }
    let stops: &[String] = match &common.stop {
        None => &[],
        Some(StopField::One(s)) => std::slice::from_ref(s),
        Some(StopField::Many(v)) => v,
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad_param(
            "stop",
            format!(
                "`stop` has {} strings; at most {MAX_STOPS} are allowed",
                stops.len()
            ),
        ));
    }
    if let Some(long) = stops.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_param(
            "stop",
            format!(
                "a `stop` string is {} bytes long; each may be at most {MAX_STOP_BYTES}",
                long.len()
            ),
        ));
    }
    if common.max_completion_tokens == Some(0) || common.max_tokens == Some(0) {
        return Err(ApiError::bad_param(
            "max_tokens",
            "the token limit must be at least 1",
        ));
    }
    Ok(())
}

fn stops_of(common: &CommonParams) -> Vec<String> {
    match &common.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    }
}

/// Request values, else the model's `generation_config.json` defaults, else neutral values.
fn sampling(common: &CommonParams, model: &Model) -> Sampling {
    let neutral = Sampling::default();
    let d = &model.defaults;
    Sampling {
        temperature: common.temperature.or(d.temperature).unwrap_or(1.0),
        top_k: match common.top_k {
            Some(k) if k > 0 => k as u32,
            Some(_) => 0,
            None => d.top_k.unwrap_or(neutral.top_k),
        },
        top_p: common.top_p.or(d.top_p).unwrap_or(neutral.top_p),
        min_p: common.min_p.or(d.min_p).unwrap_or(neutral.min_p),
        repetition_penalty: common
            .repetition_penalty
            .or(d.repetition_penalty)
            .unwrap_or(neutral.repetition_penalty),
        presence_penalty: common.presence_penalty.unwrap_or(neutral.presence_penalty),
        frequency_penalty: common
            .frequency_penalty
            .unwrap_or(neutral.frequency_penalty),
        seed: common.seed,
    }
}

/// `prompt_param` names the request field the prompt came from (`messages` or `prompt`).
fn params(
    common: &CommonParams,
    model: &Model,
    prompt_len: usize,
    prompt_param: &str,
) -> Result<GenerateParams, ApiError> {
    let context = model.loaded.context_length as usize;
    if prompt_len >= context {
        return Err(ApiError::bad_param(
            prompt_param,
            format!(
                "the prompt has {prompt_len} tokens but model {:?} has a context of {context}; shorten it",
                model.id
            ),
        ));
    }
    let room = (context - prompt_len) as u32;
    let max_tokens = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(room)
        .min(room);
    Ok(GenerateParams {
        max_tokens,
        stop_ids: model.tokenizer.eos_ids.clone(),
        sampling: sampling(common, model),
    })
}

/// Check a message list before rendering: objects with a known role.
fn validate_messages(messages: &[Json]) -> Result<Vec<Json>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "`messages` must not be empty",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let object = message.as_object().ok_or_else(|| {
                ApiError::bad_param("messages", format!("messages[{i}] must be an object"))
            })?;
            let role = object.get("role").and_then(Json::as_str).ok_or_else(|| {
                ApiError::bad_param("messages", format!("messages[{i}].role must be a string"))
            })?;
            let mut message = message.clone();
            match role {
                "system" | "user" | "assistant" | "tool" => {}
                // OpenAI's newer name for system; templates only know `system`.
                "developer" => message["role"] = Json::from("system"),
                other => {
                    return Err(ApiError::bad_param(
                        "messages",
                        format!(
                            "messages[{i}].role {other:?} is not one of system, developer, user, assistant, tool"
                        ),
                    ));
                }
            }
            match object.get("content") {
                None | Some(Json::Null | Json::String(_) | Json::Array(_)) => {}
                Some(_) => {
                    return Err(ApiError::bad_param(
                        "messages",
                        format!("messages[{i}].content must be a string, a list of parts, or null"),
                    ));
                }
            }
            Ok(message)
        })
        .collect()
}

/// Render a chat request's prompt text (also used by `/tokenize` and `/apply-template`).
pub fn render_chat(
    model: &Model,
    messages: &[Json],
    tools: Option<&[Json]>,
    kwargs: Option<&Map<String, Json>>,
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    let template = model.template.as_ref().ok_or_else(|| {
        ApiError::bad_param(
            "messages",
            format!(
                "model {:?} has no chat template; use /v1/completions with a prompt",
                model.id
            ),
        )
    })?;
    let messages = validate_messages(messages)?;
    if let Some(tools) = tools {
        for (i, tool) in tools.iter().enumerate() {
            let name = tool
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Json::as_str);
            if name.is_none() {
                return Err(ApiError::bad_param(
                    "tools",
                    format!(
                        "tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
                    ),
                ));
            }
        }
    }
    Ok(template.render(&RenderInput {
        messages: &messages,
        tools,
        add_generation_prompt,
        kwargs,
    })?)
}

/// What a chat request's `tool_choice` asks for (OpenAI's values).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ToolChoice {
    /// The model decides (the default).
    Auto,
    /// No tools: they are not shown to the model and markers in its output are text.
    None,
    /// At least one tool call.
    Required,
    /// A call of this tool.
    Named(String),
}

impl ToolChoice {
    fn parse(value: Option<&Json>) -> Result<Self, ApiError> {
        let invalid = || {
            ApiError::bad_param(
                "tool_choice",
                "`tool_choice` must be \"auto\", \"none\", \"required\" or \
                 {\"type\": \"function\", \"function\": {\"name\": …}}",
            )
        };
        match value {
            None | Some(Json::Null) => Ok(Self::Auto),
            Some(Json::String(s)) => match s.as_str() {
                "auto" => Ok(Self::Auto),
                "none" => Ok(Self::None),
                "required" => Ok(Self::Required),
                _ => Err(invalid()),
            },
            Some(Json::Object(o)) if o.get("type").and_then(Json::as_str) == Some("function") => o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Json::as_str)
                .map(|n| Self::Named(n.to_owned()))
                .ok_or_else(invalid),
            Some(_) => Err(invalid()),
        }
    }

    /// The text that starts the assistant's reply when a call is forced: the model's tool-call
    /// marker, and for a named tool the call's opening up to its arguments, so the model only
    /// writes the arguments. Errors when nothing can be forced.
    fn forced_call(
        &self,
        model: &Model,
        tools: Option<&[Json]>,
    ) -> Result<Option<(String, String)>, ApiError> {
        if matches!(self, Self::Auto | Self::None) {
            return Ok(None);
        }
        let Some(tools) = tools else {
            return Err(ApiError::bad_param(
                "tool_choice",
                "`tool_choice` asks for a tool call but the request offers no `tools`",
            ));
        };
        let Some(marker) = model.tokenizer.markers.tool_start.clone() else {
            return Err(ApiError::bad_param(
                "tool_choice",
                format!(
                    "model {:?} has no tool-call markers, so a call cannot be required",
                    model.id
                ),
            ));
        };
        let body = match self {
            Self::Named(name) => {
                let offered = tools.iter().any(|t| {
                    t.get("function")
                        .and_then(|f| f.get("name"))
                        .and_then(Json::as_str)
                        == Some(name.as_str())
                });
                if !offered {
                    return Err(ApiError::bad_param(
                        "tool_choice",
                        format!("`tool_choice` names {name:?}, which is not among `tools`"),
                    ));
                }
                format!(
                    "\n{{\"name\": {}, \"arguments\": ",
                    Json::String(name.clone())
                )
            }
            _ => "\n".to_owned(),
        };
        Ok(Some((marker, body)))
    }
}

async fn prepare_chat(state: &AppState, request: ChatRequest) -> Result<Prepared, ApiError> {
    validate_common(&request.common)?;
    let model = state.model(&request.common.model)?;
    let choice = ToolChoice::parse(request.tool_choice.as_ref())?;
    let tools: Option<Vec<Json>> = request
        .tools
        .filter(|t| !t.is_empty() && choice != ToolChoice::None);
    let forced = choice.forced_call(&model, tools.as_deref())?;
    // Template rendering and tokenization are CPU-bound: keep them off the async workers.
    let (text, prompt, tools, forced_body) = {
        let model = model.clone();
        let messages = request.messages;
        let kwargs = request.chat_template_kwargs;
        tokio::task::spawn_blocking(move || {
            let mut text = render_chat(&model, &messages, tools.as_deref(), kwargs.as_ref(), true)?;
            // A forced call starts the reply: it is part of the prompt, and the parser starts
            // inside the call. An open reasoning block is closed first (no reasoning then).
            let forced_body = forced.map(|(marker, body)| {
                let markers = &model.tokenizer.markers;
                if let Some(end) = &markers.think_end
                    && markers.prompt_opens_reasoning(&text)
                {
                    text.push_str(end);
                    text.push_str("\n\n");
                }
                text.push_str(&marker);
                text.push_str(&body);
                body
            });
            let prompt = model.tokenizer.encode(&text)?;
            Ok::<_, ApiError>((text, prompt, tools, forced_body))
        })
        .await
        .map_err(ApiError::internal)??
    };
    let params = params(&request.common, &model, prompt.len(), "messages")?;
    let mut markers = model.tokenizer.markers.clone();
    if tools.is_none() {
        // Without tools offered, tool-call markers are plain text.
        markers.tool_start = None;
        markers.tool_end = None;
    }
    let starts_in_reasoning = markers.prompt_opens_reasoning(&text);
    let mut parser = OutputParser::new(
        markers,
        tools.as_deref().unwrap_or_default(),
        starts_in_reasoning,
    );
    if let Some(body) = &forced_body {
        parser.start_in_tool_call(body);
    }
    let (include_usage, continuous_usage) =
        StreamOptions::flags(request.common.stream_options.as_ref());
    Ok(Prepared {
        stops: stops_of(&request.common),
        stream: request.common.stream.unwrap_or(false),
        include_usage,
        continuous_usage,
        model,
        prompt,
        params,
        parse: Parse::Chat(Box::new(parser)),
    })
}

async fn prepare_completion(
    state: &AppState,
    request: CompletionRequest,
) -> Result<Prepared, ApiError> {
    validate_common(&request.common)?;
    if request.echo == Some(true) {
        return Err(ApiError::bad_param("echo", "`echo` is not supported"));
    }
    let model = state.model(&request.common.model)?;
    // Tokenization is CPU-bound: keep it off the async workers.
    let encode = |text: String| {
        let model = model.clone();
        async move {
            tokio::task::spawn_blocking(move || model.tokenizer.encode(&text))
                .await
                .map_err(ApiError::internal)?
                .map_err(ApiError::from)
        }
    };
    let prompt = match &request.prompt {
        Json::String(text) => encode(text.clone()).await?,
        Json::Array(items) if items.len() == 1 && items[0].is_string() => {
            encode(items[0].as_str().unwrap_or_default().to_owned()).await?
        }
        Json::Array(items) if !items.is_empty() && items.iter().all(Json::is_u64) => {
            let vocab = model.loaded.vocab_size as u64;
            items
                .iter()
                .map(|v| match v.as_u64() {
                    Some(id) if id < vocab => Ok(id as u32),
                    _ => Err(ApiError::bad_param(
                        "prompt",
                        format!("token id {v} is outside the vocabulary (size {vocab})"),
                    )),
                })
                .collect::<Result<Vec<u32>, ApiError>>()?
        }
        _ => {
            return Err(ApiError::bad_param(
                "prompt",
                "`prompt` must be a string, a one-element list of strings, or a list of token ids",
            ));
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad_param("prompt", "`prompt` must not be empty"));
    }
    let params = params(&request.common, &model, prompt.len(), "prompt")?;
    let (include_usage, continuous_usage) =
        StreamOptions::flags(request.common.stream_options.as_ref());
    Ok(Prepared {
        stops: stops_of(&request.common),
        stream: request.common.stream.unwrap_or(false),
        include_usage,
        continuous_usage,
        model,
        prompt,
        params,
        parse: Parse::Raw,
    })
}

enum EngineMessage {
    Token(u32),
    Done(Result<GenerateSummary, BackendError>),
}

/// What the driver reports to its sink.
enum Output {
    /// A parsed event, with the number of tokens generated so far.
    Event(Event, u32),
}

/// How a generation ended.
struct Outcome {
    finish_reason: &'static str,
    usage: Usage,
}

/// The `in_flight` gauge of one generation; decrements when dropped.
struct InFlight(prometheus::IntGauge);

impl InFlight {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Run one generation: the engine on a blocking thread, tokens to `sink` as parsed events.
/// `sink` returns false when the client is gone, which cancels the engine.
async fn drive(
    state: &AppState,
    prepared: Prepared,
    permit: Permit,
    mut sink: impl FnMut(Output) -> bool,
) -> Result<Outcome, ApiError> {
    let Prepared {
        model,
        prompt,
        params,
        stops,
        mut parse,
        ..
    } = prepared;
    let metrics = state.metrics().clone();
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel::<EngineMessage>(256);
    let cancel = Arc::new(AtomicBool::new(false));
    let engine_cancel = cancel.clone();
    let backend = state.0.backend.clone();
    let handle = model.loaded.handle;
    let prompt_len = prompt.len() as u32;
    let stop_ids = params.stop_ids.clone();
    // Decremented on drop, so an early return or a dropped request future cannot leak it.
    let in_flight = InFlight::new(metrics.in_flight.with_label_values(&[&model.id]));
    let worker = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let result = backend.generate(handle, &params, &prompt, &mut |token| {
            if engine_cancel.load(Ordering::Relaxed) {
                return Flow::Cancel;
            }
            match tx.blocking_send(EngineMessage::Token(token)) {
                Ok(()) => Flow::Continue,
                // The request is gone (client disconnected): stop generating.
                Err(_) => Flow::Cancel,
            }
        });
        let _ = tx.blocking_send(EngineMessage::Done(result));
    });

    let mut detok = model.tokenizer.detokenizer();
    let mut stop = StopMatcher::new(stops);
    let mut received = 0u32;
    let mut reasoning_tokens = 0u32;
    let mut stopped_by_string = false;
    let mut summary = None;
    let mut client_gone = false;
    let think_ids: Vec<u32> = [
        &model.tokenizer.markers.think_start,
        &model.tokenizer.markers.think_end,
    ]
    .iter()
    .filter_map(|m| m.as_deref())
    .filter_map(|m| model.tokenizer.encode(m).ok())
    .filter(|ids| ids.len() == 1)
    .map(|ids| ids[0])
    .collect();

    let mut deliver = |text: &str, generated: u32, parse: &mut Parse, client_gone: &mut bool| {
        let events = match parse {
            Parse::Chat(parser) => parser.push(text),
            Parse::Raw if text.is_empty() => Vec::new(),
            Parse::Raw => vec![Event::Content(text.to_owned())],
        };
        for event in events {
            if !*client_gone && !sink(Output::Event(event, generated)) {
                *client_gone = true;
            }
        }
    };

    while let Some(message) = rx.recv().await {
        match message {
            EngineMessage::Token(token) => {
                received += 1;
                if received == 1 {
                    metrics
                        .first_token_seconds
                        .with_label_values(&[&model.id])
                        .observe(started.elapsed().as_secs_f64());
                }
                if stopped_by_string || client_gone || stop_ids.contains(&token) {
                    continue;
                }
                let text = detok.push(token)?;
                let safe = stop.push(&text);
                deliver(&safe, received, &mut parse, &mut client_gone);
                if let Parse::Chat(parser) = &parse
                    && (parser.in_reasoning() || think_ids.contains(&token))
                {
                    reasoning_tokens += 1;
                }
                if stop.stopped() {
                    stopped_by_string = true;
                    cancel.store(true, Ordering::Relaxed);
                }
                if client_gone {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
            EngineMessage::Done(result) => {
                summary = Some(result);
                break;
            }
        }
    }
    drop(in_flight);
    // The worker only ends after sending Done (or panicking): surface a panic as a 500.
    worker.await.map_err(ApiError::internal)?;
    let Some(summary) = summary else {
        return Err(ApiError::internal("engine worker ended without a summary"));
    };
    let summary = match summary {
        Ok(summary) => summary,
        Err(error) => {
            if error.kind == helexa_engine_abi::ErrorKind::DeviceFault {
                state.mark_failed(&model, &error.message);
            }
            return Err(ApiError::from(error));
        }
    };
    if !stopped_by_string {
        let tail = detok.finish()?;
        let mut text = stop.push(&tail);
        if stop.stopped() {
            stopped_by_string = true;
        } else {
            text.push_str(&stop.finish());
        }
        deliver(
            &text,
            summary.generated_tokens,
            &mut parse,
            &mut client_gone,
        );
    }
    let mut tool_calls = 0;
    if let Parse::Chat(parser) = &mut parse {
        for event in parser.finish() {
            if !client_gone && !sink(Output::Event(event, summary.generated_tokens)) {
                client_gone = true;
            }
        }
        tool_calls = parser.tool_call_count();
    }
    let finish_reason = if stopped_by_string {
        "stop"
    } else {
        match summary.finish {
            Finish::Length => "length",
            Finish::Stop | Finish::Cancelled => "stop",
        }
    };
    let finish_reason = if tool_calls > 0 && finish_reason == "stop" {
        "tool_calls"
    } else {
        finish_reason
    };
    let usage = Usage {
        prompt: prompt_len,
        cached: summary.reused_prompt_tokens,
        completion: summary.generated_tokens,
        reasoning: reasoning_tokens,
    };
    metrics
        .prompt_tokens
        .with_label_values(&[&model.id])
        .inc_by(u64::from(prompt_len));
    metrics
        .cached_prompt_tokens
        .with_label_values(&[&model.id])
        .inc_by(u64::from(usage.cached));
    metrics
        .generated_tokens
        .with_label_values(&[&model.id])
        .inc_by(u64::from(usage.completion));
    model.touch(state.0.started);
    Ok(Outcome {
        finish_reason,
        usage,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Surface {
    Chat,
    Completion,
}

/// Serve a prepared request, streamed or not.
async fn serve(
    state: AppState,
    prepared: Prepared,
    surface: Surface,
) -> Result<Response, ApiError> {
    if state.is_draining() {
        return Err(ApiError::unavailable(
            helexa_node_api::error_code::OVERLOADED,
            "the node is shutting down; send the request to another node",
            10,
        ));
    }
    let permit = prepared
        .model
        .gate
        .admit(&prepared.model.id, state.metrics())
        .await?;
    prepared.model.touch(state.0.started);
    let created = unix_now();
    let model_id = prepared.model.id.clone();
    let id = match surface {
        Surface::Chat => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        Surface::Completion => format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
    };
    if !prepared.stream {
        let mut content = String::new();
        let mut reasoning = String::new();
        let mut calls = Vec::new();
        let outcome = drive(&state, prepared, permit, |Output::Event(event, _)| {
            match event {
                Event::Content(text) => content.push_str(&text),
                Event::Reasoning(text) => reasoning.push_str(&text),
                Event::ToolCall { call, .. } => calls.push(json!({
                    "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}})),
            }
            true
        })
        .await?;
        let body = match surface {
            Surface::Chat => {
                let mut message = json!({
                    "role": "assistant",
                    "content": if content.is_empty() && !calls.is_empty() { Json::Null } else { Json::from(content) },
                });
                if !reasoning.is_empty() {
                    message["reasoning_content"] = Json::from(reasoning);
                }
                if !calls.is_empty() {
                    message["tool_calls"] = Json::Array(calls);
                }
                json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": message, "logprobs": null,
                                 "finish_reason": outcome.finish_reason}],
                    "usage": outcome.usage.to_json(),
                })
            }
            Surface::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "text": content, "logprobs": null,
                             "finish_reason": outcome.finish_reason}],
                "usage": outcome.usage.to_json(),
            }),
        };
        return Ok(axum::Json(body).into_response());
    }

    let include_usage = prepared.include_usage;
    let continuous_usage = prepared.continuous_usage;
    let prompt_tokens = prepared.prompt.len() as u32;
    // The running counts (vLLM's continuous usage stats): the prefix-cache hit is only known
    // once the engine reports, so `prompt_tokens_details` waits for the final counts.
    let running_usage = move |generated: u32| {
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": generated,
               "total_tokens": prompt_tokens + generated})
    };
    let (tx, rx) = mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    // `usage` is the chunk's counts under continuous usage stats; otherwise OpenAI's `null`
    // (with `include_usage`) or no field at all.
    let chunk = move |choice: Json, usage: Json| {
        let mut chunk = match surface {
            Surface::Chat => {
                json!({"id": id, "object": "chat.completion.chunk", "created": created,
                                    "model": model_id, "choices": [choice]})
            }
            Surface::Completion => {
                json!({"id": id, "object": "text_completion", "created": created,
                                          "model": model_id, "choices": [choice]})
            }
        };
        if continuous_usage {
            chunk["usage"] = usage;
        } else if include_usage {
            chunk["usage"] = Json::Null;
        }
        chunk
    };
    let send = {
        let tx = tx.clone();
        move |value: Json| {
            tx.send(Ok(SseEvent::default().data(value.to_string())))
                .is_ok()
        }
    };
    let task_state = state.clone();
    tokio::spawn(async move {
        if surface == Surface::Chat {
            send(chunk(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                              "logprobs": null, "finish_reason": null}),
                running_usage(0),
            ));
        }
        let result = drive(&task_state, prepared, permit, |Output::Event(event, generated)| {
            let delta = match (surface, event) {
                (Surface::Completion, Event::Content(text)) => {
                    return send(chunk(
                        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}),
                        running_usage(generated),
                    ));
                }
                (Surface::Completion, _) => return true,
                (_, Event::Content(text)) => json!({"content": text}),
                (_, Event::Reasoning(text)) => json!({"reasoning_content": text}),
                (_, Event::ToolCall { index, call }) => {
                    json!({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments}}]})
                }
            };
            send(chunk(
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}),
                running_usage(generated),
            ))
        })
        .await;
        match result {
            Ok(outcome) => {
                let last = match surface {
                    Surface::Chat => json!({"index": 0, "delta": {}, "logprobs": null,
                                            "finish_reason": outcome.finish_reason}),
                    Surface::Completion => json!({"index": 0, "text": "", "logprobs": null,
                                                  "finish_reason": outcome.finish_reason}),
                };
                send(chunk(last, outcome.usage.to_json()));
                if include_usage {
                    let mut usage_chunk = chunk(Json::Null, Json::Null);
                    usage_chunk["choices"] = json!([]);
                    usage_chunk["usage"] = outcome.usage.to_json();
                    send(usage_chunk);
                }
            }
            Err(error) => {
                // Headers are gone: the error travels as a terminal event in the envelope shape.
                send(serde_json::to_value(&error.envelope).unwrap_or(Json::Null));
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
    });
    Ok(Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).into_response())
}

/// `POST /v1/chat/completions`.
pub async fn chat(state: AppState, request: ChatRequest) -> Result<Response, ApiError> {
    let prepared = prepare_chat(&state, request).await?;
    serve(state, prepared, Surface::Chat).await
}

/// `POST /v1/completions`.
pub async fn completion(state: AppState, request: CompletionRequest) -> Result<Response, ApiError> {
    let prepared = prepare_completion(&state, request).await?;
    serve(state, prepared, Surface::Completion).await
}
