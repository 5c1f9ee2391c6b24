//! Incremental output parsing: split generated text into content, reasoning and tool calls, and
//! cut it at stop strings.
//!
//! Generation streams text in arbitrary pieces (a token can hold half a marker, or a marker can
//! span tokens), so both stages here hold back any tail that could still become a marker or stop
//! string, and release it as soon as it cannot. Everything is pure: the same text split at any
//! byte boundary yields the same events (merged).
//!
//! Tool calls are emitted whole when their closing marker arrives (one OpenAI delta with id, name
//! and the complete arguments), which every OpenAI client accepts and which avoids streaming
//! arguments that later turn out not to parse.

use serde_json::{Map, Value as Json};

/// The markers a model uses, discovered from its tokenizer (see [`Markers::from_added_tokens`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Markers {
    /// Opens a reasoning block (`<think>`).
    pub think_start: Option<String>,
    /// Closes a reasoning block (`</think>`).
    pub think_end: Option<String>,
    /// Opens a tool call (`<tool_call>`).
    pub tool_start: Option<String>,
    /// Closes a tool call (`</tool_call>`).
    pub tool_end: Option<String>,
}

impl Markers {
    /// Find think and tool-call marker pairs among a tokenizer's added tokens: a token `<X>` with
    /// a matching `</X>`, where X names thinking/reasoning or a tool call. Models differ in the
    /// exact spelling (`<think>`, `<thinking>`, `<reasoning>`), so the pair is searched, not fixed.
    pub fn from_added_tokens<'a>(tokens: impl IntoIterator<Item = &'a str> + Clone) -> Self {
        let find_pair = |accept: &dyn Fn(&str) -> bool| -> Option<(String, String)> {
            tokens.clone().into_iter().find_map(|open| {
                let inner = open.strip_prefix('<')?.strip_suffix('>')?;
                if inner.starts_with('/') || !accept(inner) {
                    return None;
                }
                let close = format!("</{inner}>");
                tokens
                    .clone()
                    .into_iter()
                    .any(|t| t == close)
                    .then(|| (open.to_owned(), close))
            })
        };
        let think = find_pair(&|inner: &str| {
            let lower = inner.to_ascii_lowercase();
            lower.contains("think") || lower.contains("reason")
        });
        let tool = find_pair(&|inner: &str| inner.eq_ignore_ascii_case("tool_call"));
        Self {
            think_start: think.as_ref().map(|p| p.0.clone()),
            think_end: think.map(|p| p.1),
            tool_start: tool.as_ref().map(|p| p.0.clone()),
            tool_end: tool.map(|p| p.1),
        }
    }

    /// Whether a prompt ends inside an open reasoning block (templates that pre-open `<think>`).
    pub fn prompt_opens_reasoning(&self, prompt: &str) -> bool {
        let (Some(start), Some(end)) = (&self.think_start, &self.think_end) else {
            return false;
        };
        match (prompt.rfind(start.as_str()), prompt.rfind(end.as_str())) {
            (Some(s), Some(e)) => s > e,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// A structured tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_…`, unique per call.
    pub id: String,
    /// Function name.
    pub name: String,
    /// Arguments as a JSON object text (OpenAI sends arguments as a string).
    pub arguments: String,
}

/// One piece of parsed output, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Visible answer text.
    Content(String),
    /// Text inside the reasoning markers.
    Reasoning(String),
    /// A complete tool call; `index` counts calls from 0.
    ToolCall {
        /// Position among this response's tool calls.
        index: usize,
        /// The call.
        call: ToolCall,
    },
}

/// Holds back text that could be the start of a stop string; reports when one is hit.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string was hit (further input is ignored).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feed text; returns what is safe to emit.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(position) = earliest {
            self.stopped = true;
            let out = self.held[..position].to_owned();
            self.held.clear();
            return out;
        }
        let keep = self
            .stops
            .iter()
            .map(|stop| partial_suffix(&self.held, stop))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        out
    }

    /// End of generation: release what was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest proper suffix of `text` that is a prefix of `marker` (at a char boundary).
fn partial_suffix(text: &str, marker: &str) -> usize {
    let longest = text.len().min(marker.len().saturating_sub(1));
    (1..=longest)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && marker
                    .as_bytes()
                    .starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Content,
    Reasoning,
    ToolCall,
}

/// Splits generated text into [`Event`]s.
#[derive(Debug, Clone)]
pub struct OutputParser {
    markers: Markers,
    /// Parameter types per function, from the request's tool schemas (for the XML call form).
    tools: Vec<Json>,
    mode: Mode,
    /// Text of the current mode not yet emitted (possible marker prefix, or a tool-call body).
    buffer: String,
    /// Whitespace-only content held back: dropped when it merely separates blocks.
    pending_whitespace: String,
    /// Strip leading whitespace from the next content/reasoning text (just after a marker).
    trim_next: bool,
    tool_calls: usize,
}

impl OutputParser {
    /// `starts_in_reasoning`: the prompt ended inside an open think block.
    pub fn new(markers: Markers, tools: &[Json], starts_in_reasoning: bool) -> Self {
        let in_reasoning = starts_in_reasoning && markers.think_end.is_some();
        Self {
            markers,
            tools: tools.to_vec(),
            mode: if in_reasoning {
                Mode::Reasoning
            } else {
                Mode::Content
            },
            buffer: String::new(),
            pending_whitespace: String::new(),
            trim_next: in_reasoning,
            tool_calls: 0,
        }
    }

    /// The prompt ended inside a tool call whose text so far (after the opening marker) is
    /// `body` (`tool_choice` forcing a call): the output continues that call.
    pub fn start_in_tool_call(&mut self, body: &str) {
        self.mode = Mode::ToolCall;
        self.buffer = body.to_owned();
        self.trim_next = false;
    }

    /// Whether the parser is inside a reasoning block (for reasoning-token accounting).
    pub fn in_reasoning(&self) -> bool {
        self.mode == Mode::Reasoning
    }

    /// How many tool calls were emitted so far.
    pub fn tool_call_count(&self) -> usize {
        self.tool_calls
    }

    /// Feed a piece of text.
    pub fn push(&mut self, text: &str) -> Vec<Event> {
        self.buffer.push_str(text);
        let mut events = Vec::new();
        loop {
            let markers: Vec<(&str, Mode)> = match self.mode {
                Mode::Content => [
                    (self.markers.think_start.as_deref(), Mode::Reasoning),
                    (self.markers.tool_start.as_deref(), Mode::ToolCall),
                ]
                .into_iter()
                .filter_map(|(m, next)| Some((m?, next)))
                .collect(),
                Mode::Reasoning => self
                    .markers
                    .think_end
                    .as_deref()
                    .map(|m| vec![(m, Mode::Content)])
                    .unwrap_or_default(),
                Mode::ToolCall => self
                    .markers
                    .tool_end
                    .as_deref()
                    .map(|m| vec![(m, Mode::Content)])
                    .unwrap_or_default(),
            };
            let found = markers
                .iter()
                .filter_map(|(m, next)| self.buffer.find(m).map(|pos| (pos, m.len(), *next)))
                .min_by_key(|(pos, _, _)| *pos);
            match found {
                Some((pos, len, next)) => {
                    let before: String = self.buffer[..pos].to_owned();
                    self.buffer.drain(..pos + len);
                    self.close_segment(before, next, true, &mut events);
                    self.mode = next;
                }
                None => {
                    if self.mode != Mode::ToolCall {
                        let keep = markers
                            .iter()
                            .map(|(m, _)| partial_suffix(&self.buffer, m))
                            .max()
                            .unwrap_or(0);
                        let cut = self.buffer.len() - keep;
                        let ready: String = self.buffer.drain(..cut).collect();
                        self.emit_text(ready, &mut events);
                    }
                    return events;
                }
            }
        }
    }

    /// End of generation: flush everything held back. An unterminated tool call is still parsed
    /// (generation may stop on the closing token); if it does not parse, it was cut off (by
    /// `max_tokens`) and is dropped: half a call is useless as a call and must not leak into
    /// `content`, where clients would show it. A *closed* call that does not parse is kept as
    /// content: the model finished it, and the text is all there is to show.
    pub fn finish(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.buffer);
        match self.mode {
            Mode::ToolCall => self.close_segment(rest, Mode::Content, false, &mut events),
            _ => self.emit_text(rest, &mut events),
        }
        self.mode = Mode::Content;
        if self.tool_calls == 0 && !self.pending_whitespace.is_empty() {
            let text = std::mem::take(&mut self.pending_whitespace);
            push_event(&mut events, Event::Content(text));
        }
        events
    }

    /// The current mode's segment ended (with its closing marker when `closed`), switching to `next`.
    fn close_segment(&mut self, text: String, next: Mode, closed: bool, events: &mut Vec<Event>) {
        match self.mode {
            Mode::ToolCall => {
                if let Some((name, arguments)) = parse_tool_call(&text, &self.tools) {
                    self.pending_whitespace.clear();
                    let call = ToolCall {
                        id: format!("call_{}", uuid::Uuid::new_v4().simple()),
                        name,
                        arguments,
                    };
                    events.push(Event::ToolCall {
                        index: self.tool_calls,
                        call,
                    });
                    self.tool_calls += 1;
                    self.trim_next = true;
                } else if closed {
                    let start = self.markers.tool_start.clone().unwrap_or_default();
                    let end = self.markers.tool_end.clone().unwrap_or_default();
                    self.emit_text(format!("{start}{text}{end}"), events);
                } else {
                    tracing::debug!(
                        bytes = text.len(),
                        "dropping a tool call cut off before its end"
                    );
                }
            }
            _ => {
                self.emit_text(text, events);
                if next == Mode::ToolCall {
                    // Whitespace that only separated content from a call is not content.
                    self.pending_whitespace.clear();
                }
                self.trim_next = true;
            }
        }
    }

    fn emit_text(&mut self, mut text: String, events: &mut Vec<Event>) {
        if self.trim_next {
            let trimmed = text.trim_start();
            if trimmed.is_empty() {
                return;
            }
            text = trimmed.to_owned();
            self.trim_next = false;
        }
        if text.is_empty() {
            return;
        }
        match self.mode {
            Mode::Reasoning => push_event(events, Event::Reasoning(text)),
            _ => {
                if text.trim().is_empty() {
                    self.pending_whitespace.push_str(&text);
                    return;
                }
                let body = text.trim_end();
                let trailing = text[body.len()..].to_owned();
                let mut out = std::mem::take(&mut self.pending_whitespace);
                out.push_str(body);
                self.pending_whitespace = trailing;
                push_event(events, Event::Content(out));
            }
        }
    }
}

/// Append, merging with a previous event of the same text kind.
fn push_event(events: &mut Vec<Event>, event: Event) {
    match (events.last_mut(), event) {
        (Some(Event::Content(a)), Event::Content(b)) => a.push_str(&b),
        (Some(Event::Reasoning(a)), Event::Reasoning(b)) => a.push_str(&b),
        (_, event) => events.push(event),
    }
}

/// Parse a tool-call body: `{"name": …, "arguments": {…}}` (Hermes/Qwen JSON form) or
/// `<function=NAME><parameter=K>V</parameter>…</function>` (Qwen XML form).
/// Returns (name, arguments as JSON text).
pub fn parse_tool_call(body: &str, tools: &[Json]) -> Option<(String, String)> {
    let body = body.trim();
    if body.starts_with('{') {
        let value: Json = serde_json::from_str(body).ok()?;
        let name = value.get("name")?.as_str()?.to_owned();
        let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
            None | Some(Json::Null) => "{}".to_owned(),
            // Some models double-encode arguments as a string.
            Some(Json::String(text)) => match serde_json::from_str::<Json>(text) {
                Ok(parsed @ Json::Object(_)) => parsed.to_string(),
                _ => return None,
            },
            Some(args @ Json::Object(_)) => args.to_string(),
            Some(_) => return None,
        };
        return Some((name, arguments));
    }
    let rest = body.strip_prefix("<function=")?;
    let (name, mut rest) = rest.split_once('>')?;
    let name = name.trim().to_owned();
    let mut arguments = Map::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("<parameter=") {
            let (key, after) = after.split_once('>')?;
            let (value, after) = after.split_once("</parameter>")?;
            let value = value.strip_prefix('\n').unwrap_or(value);
            let value = value.strip_suffix('\n').unwrap_or(value);
            let key = key.trim().to_owned();
            let typed = parameter_value(value, parameter_type(tools, &name, &key));
            arguments.insert(key, typed);
            rest = after;
        } else if rest.starts_with("</function>") || rest.is_empty() {
            break;
        } else {
            return None;
        }
    }
    Some((name, Json::Object(arguments).to_string()))
}

/// The JSON-schema type of a function parameter in the request's tools, if declared.
fn parameter_type<'a>(tools: &'a [Json], function: &str, parameter: &str) -> Option<&'a str> {
    tools.iter().find_map(|tool| {
        let f = tool.get("function").unwrap_or(tool);
        if f.get("name")?.as_str()? != function {
            return None;
        }
        f.get("parameters")?
            .get("properties")?
            .get(parameter)?
            .get("type")?
            .as_str()
    })
}

/// XML-form values are raw text: strings stay strings (the schema says so, or it is not JSON);
/// other declared types are parsed as JSON.
fn parameter_value(raw: &str, declared: Option<&str>) -> Json {
    if declared == Some("string") {
        return Json::String(raw.to_owned());
    }
    serde_json::from_str(raw.trim()).unwrap_or_else(|_| Json::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen_markers() -> Markers {
        Markers::from_added_tokens([
            "<|im_start|>",
            "<|im_end|>",
            "<think>",
            "</think>",
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
        ])
    }

    /// Merge adjacent text events and blank out ids, so different splits compare equal.
    fn normalize(events: Vec<Event>) -> Vec<Event> {
        let mut out = Vec::new();
        for event in events {
            let event = match event {
                Event::ToolCall { index, mut call } => {
                    assert!(call.id.starts_with("call_"), "id {}", call.id);
                    call.id.clear();
                    Event::ToolCall { index, call }
                }
                other => other,
            };
            push_event(&mut out, event);
        }
        out
    }

    fn run(text: &str, pieces: &[usize], starts_in_reasoning: bool) -> Vec<Event> {
        let mut parser = OutputParser::new(qwen_markers(), &[], starts_in_reasoning);
        let mut events = Vec::new();
        let mut last = 0;
        for &cut in pieces.iter().chain([text.len()].iter()) {
            events.extend(parser.push(&text[last..cut]));
            last = cut;
        }
        events.extend(parser.finish());
        normalize(events)
    }

    /// Every split into two pieces and into single bytes (at char boundaries) must agree.
    fn check_all_splits(text: &str, starts_in_reasoning: bool, expected: &[Event]) {
        assert_eq!(run(text, &[], starts_in_reasoning), expected, "whole");
        for cut in (1..text.len()).filter(|&c| text.is_char_boundary(c)) {
            assert_eq!(
                run(text, &[cut], starts_in_reasoning),
                expected,
                "split at {cut}"
            );
        }
        let all: Vec<usize> = (1..text.len())
            .filter(|&c| text.is_char_boundary(c))
            .collect();
        assert_eq!(run(text, &all, starts_in_reasoning), expected, "bytes");
    }

    fn call(index: usize, name: &str, arguments: &str) -> Event {
        Event::ToolCall {
            index,
            call: ToolCall {
                id: String::new(),
                name: name.into(),
                arguments: arguments.into(),
            },
        }
    }

    #[test]
    fn markers_come_from_added_tokens() {
        let m = qwen_markers();
        assert_eq!(m.think_start.as_deref(), Some("<think>"));
        assert_eq!(m.think_end.as_deref(), Some("</think>"));
        assert_eq!(m.tool_start.as_deref(), Some("<tool_call>"));
        assert_eq!(m.tool_end.as_deref(), Some("</tool_call>"));
        let other = Markers::from_added_tokens(["<thinking>", "</thinking>", "<s>"]);
        assert_eq!(other.think_start.as_deref(), Some("<thinking>"));
        assert_eq!(other.tool_start, None);
        assert_eq!(
            Markers::from_added_tokens(["<s>", "</s>"]),
            Markers::default()
        );
    }

    /// `tool_choice` forcing a call: the prompt ends inside the call, the output finishes it.
    #[test]
    fn output_continuing_a_forced_call() {
        let tools = [serde_json::json!({"type": "function", "function": {"name": "get_weather"}})];
        for (body, output) in [
            (
                "\n{\"name\": \"get_weather\", \"arguments\": ",
                "{\"city\": \"Oslo\"}}\n</tool_call>\nDone.",
            ),
            (
                "\n",
                "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\nDone.",
            ),
        ] {
            let mut parser = OutputParser::new(qwen_markers(), &tools, false);
            parser.start_in_tool_call(body);
            let mut events = parser.push(output);
            events.extend(parser.finish());
            assert_eq!(
                normalize(events),
                [
                    call(0, "get_weather", "{\"city\":\"Oslo\"}"),
                    Event::Content("Done.".into())
                ],
                "{body:?}"
            );
        }
    }

    #[test]
    fn prompt_opening_reasoning() {
        let m = qwen_markers();
        assert!(m.prompt_opens_reasoning("<|im_start|>assistant\n<think>\n"));
        assert!(!m.prompt_opens_reasoning("assistant\n<think>\n\n</think>\n\n"));
        assert!(!m.prompt_opens_reasoning("assistant\n"));
    }

    #[test]
    fn plain_content() {
        check_all_splits(
            "Grüße 🌍, a < b",
            false,
            &[Event::Content("Grüße 🌍, a < b".into())],
        );
    }

    #[test]
    fn reasoning_then_content() {
        // The fixture model's greedy output for the `think` prompt.
        check_all_splits(
            "<think>\nTwo cities.\n</think>\n\nThe Rust language.",
            false,
            &[
                Event::Reasoning("Two cities.\n".into()),
                Event::Content("The Rust language.".into()),
            ],
        );
        check_all_splits(
            "<think>\n\n</think>\n\nThe Rust language.",
            false,
            &[Event::Content("The Rust language.".into())],
        );
    }

    #[test]
    fn prompt_inside_think_starts_in_reasoning() {
        check_all_splits(
            "\nplan it</think>\n\nanswer",
            true,
            &[
                Event::Reasoning("plan it".into()),
                Event::Content("answer".into()),
            ],
        );
    }

    #[test]
    fn json_tool_call() {
        // The fixture model's greedy output for the `tools` prompt.
        check_all_splits(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
            false,
            &[call(0, "get_weather", r#"{"city":"Oslo"}"#)],
        );
    }

    #[test]
    fn content_then_two_calls() {
        check_all_splits(
            "Checking.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": \"{\\\"y\\\": [2]}\"}\n</tool_call>",
            false,
            &[
                Event::Content("Checking.".into()),
                call(0, "a", r#"{"x":1}"#),
                call(1, "b", r#"{"y":[2]}"#),
            ],
        );
    }

    #[test]
    fn xml_tool_call() {
        let tools: Vec<Json> = vec![serde_json::json!({"type": "function", "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "days": {"type": "integer"}, "zip": {"type": "string"}}}}})];
        let text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=zip>\n0150\n</parameter>\n</function>\n</tool_call>";
        let mut parser = OutputParser::new(qwen_markers(), &tools, false);
        let mut events = Vec::new();
        for ch in text.chars() {
            events.extend(parser.push(&ch.to_string()));
        }
        events.extend(parser.finish());
        assert_eq!(
            normalize(events),
            vec![call(
                0,
                "get_weather",
                r#"{"city":"Oslo","days":3,"zip":"0150"}"#
            )]
        );
    }

    #[test]
    fn broken_tool_call_is_kept_as_content() {
        check_all_splits(
            "<tool_call>not json</tool_call> ok",
            false,
            &[Event::Content("<tool_call>not json</tool_call> ok".into())],
        );
    }

    #[test]
    fn unterminated_tool_call_still_parses() {
        check_all_splits(
            "<tool_call>{\"name\": \"f\", \"arguments\": {}}",
            false,
            &[call(0, "f", "{}")],
        );
    }

    #[test]
    fn tool_call_cut_off_by_the_length_limit_is_not_content() {
        check_all_splits(
            "Let me check. <tool_call>{\"name\": \"get_wea",
            false,
            &[Event::Content("Let me check.".into())],
        );
    }

    #[test]
    fn partial_marker_lookalikes_are_released() {
        check_all_splits(
            "a <thin b </tool c <tool_cal",
            false,
            &[Event::Content("a <thin b </tool c <tool_cal".into())],
        );
    }

    fn stop_run(text: &str, stops: &[&str], cuts: &[usize]) -> (String, bool) {
        let mut matcher = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        let mut last = 0;
        for &cut in cuts.iter().chain([text.len()].iter()) {
            out.push_str(&matcher.push(&text[last..cut]));
            last = cut;
        }
        let stopped = matcher.stopped();
        if !stopped {
            out.push_str(&matcher.finish());
        }
        (out, stopped)
    }

    #[test]
    fn stop_strings_at_every_split() {
        let text = "one two\nSTOP three STOP";
        for cut in (1..text.len()).filter(|&c| text.is_char_boundary(c)) {
            assert_eq!(
                stop_run(text, &["STOP", "\n\n"], &[cut]),
                ("one two\n".into(), true),
                "cut {cut}"
            );
        }
        let all: Vec<usize> = (1..text.len()).collect();
        assert_eq!(stop_run(text, &["STOP"], &all), ("one two\n".into(), true));
        // A partial stop string at the end is released at finish.
        assert_eq!(
            stop_run("abc ST", &["STOP"], &[4]),
            ("abc ST".into(), false)
        );
        assert_eq!(stop_run("é€x", &["€y"], &[2]), ("é€x".into(), false));
    }
}
