//! Chat templates: render OpenAI chat messages to prompt text the way Hugging Face
//! `transformers` does (`apply_chat_template`), with minijinja.
//!
//! Conformance matters more than elegance here: a prompt that differs by one newline from what
//! the model was trained on degrades it silently. So the environment mirrors transformers'
//! jinja2 sandbox: `trim_blocks` + `lstrip_blocks`, Python string methods through
//! minijinja-contrib's `pycompat`, `raise_exception`, `strftime_now`, loop controls, and a
//! `tojson` that formats like Python's `json.dumps(ensure_ascii=False)` (`", "` and `": "`
//! separators, no HTML escaping, key order kept) instead of minijinja's compact, escaped one.

use std::collections::HashMap;
use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value};
use serde_json::{Map, Value as Json};

use crate::Error;

/// Name of the template that [`ChatTemplate::render`] uses when no tools are given.
const DEFAULT_NAME: &str = "default";
/// Name of the template transformers prefers when tools are given (multi-template configs).
const TOOL_USE_NAME: &str = "tool_use";

/// A model's chat template(s), compiled once.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Names of the templates in `env`; `default` always exists.
    names: Vec<String>,
    /// Whether any template refers to `tools` (the model can be offered tools).
    mentions_tools: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("names", &self.names)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

/// What a template is rendered with.
#[derive(Debug, Default, Clone)]
pub struct RenderInput<'a> {
    /// OpenAI chat messages, as JSON objects.
    pub messages: &'a [Json],
    /// OpenAI tool definitions.
    pub tools: Option<&'a [Json]>,
    /// Append the assistant turn opener.
    pub add_generation_prompt: bool,
    /// Extra variables (e.g. `enable_thinking`), passed to the template as top-level names.
    pub kwargs: Option<&'a Map<String, Json>>,
}

impl ChatTemplate {
    /// Compile a single template.
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, Error> {
        Self::with_named(
            vec![(DEFAULT_NAME.to_owned(), source.to_owned())],
            bos_token,
            eos_token,
        )
    }

    /// Compile named templates (the list form of `tokenizer_config.json`'s `chat_template`).
    /// The first one is the default unless one is named `default`.
    pub fn with_named(
        templates: Vec<(String, String)>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Template names carry no extension, but make sure nothing is ever HTML-escaped.
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);

        let mentions_tools = templates.iter().any(|(_, source)| source.contains("tools"));
        let has_default = templates.iter().any(|(name, _)| name == DEFAULT_NAME);
        let mut names = Vec::with_capacity(templates.len() + 1);
        for (index, (name, source)) in templates.into_iter().enumerate() {
            if index == 0 && !has_default {
                env.add_template_owned(DEFAULT_NAME.to_owned(), source.clone())
                    .map_err(|e| Error::Template(format!("chat template `{name}`: {e:#}")))?;
                names.push(DEFAULT_NAME.to_owned());
            }
            env.add_template_owned(name.clone(), source)
                .map_err(|e| Error::Template(format!("chat template `{name}`: {e:#}")))?;
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if names.is_empty() {
            return Err(Error::Template("no chat template given".into()));
        }
        Ok(Self {
            env,
            names,
            mentions_tools,
            bos_token,
            eos_token,
        })
    }

    /// Find the template of a Hugging Face model directory: `chat_template.jinja` first (newer
    /// transformers write it), else `chat_template` in `tokenizer_config.json`. Special tokens
    /// come from `tokenizer_config.json`. `Ok(None)` when the model has no template.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, Error> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::Template(format!("{} is not JSON: {e}", config_path.display()))
            })?,
            Err(_) => Json::Null,
        };
        let bos = special_token(&config, "bos_token");
        let eos = special_token(&config, "eos_token");
        let jinja_path = dir.join("chat_template.jinja");
        if let Ok(source) = std::fs::read_to_string(&jinja_path) {
            return Self::new(&source, bos, eos).map(Some);
        }
        match config.get("chat_template") {
            Some(Json::String(source)) => Self::new(source, bos, eos).map(Some),
            Some(Json::Array(list)) => {
                let named = list
                    .iter()
                    .filter_map(|entry| {
                        Some((
                            entry.get("name")?.as_str()?.to_owned(),
                            entry.get("template")?.as_str()?.to_owned(),
                        ))
                    })
                    .collect::<Vec<_>>();
                Self::with_named(named, bos, eos).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The `tokenizer.chat_template` (and bos/eos token strings) of a GGUF file's metadata.
    /// `tokens` maps ids to token strings (the GGUF vocabulary, or the sibling tokenizer).
    pub fn from_gguf(path: &Path) -> Result<Option<Self>, Error> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::Template(format!("cannot open {}: {e}", path.display())))?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .map_err(|e| Error::Template(format!("cannot read GGUF {}: {e}", path.display())))?;
        let get_str = |key: &str| {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_string().ok().cloned())
        };
        let Some(source) = get_str("tokenizer.chat_template") else {
            return Ok(None);
        };
        let token_of = |key: &str| -> Option<String> {
            let id = content.metadata.get(key)?.to_u32().ok()? as usize;
            let tokens = content
                .metadata
                .get("tokenizer.ggml.tokens")?
                .to_vec()
                .ok()?;
            tokens.get(id)?.to_string().ok().cloned()
        };
        Self::new(
            &source,
            token_of("tokenizer.ggml.bos_token_id"),
            token_of("tokenizer.ggml.eos_token_id"),
        )
        .map(Some)
    }

    /// Whether the template renders `tools`.
    pub fn mentions_tools(&self) -> bool {
        self.mentions_tools
    }

    /// The eos token string (from `tokenizer_config.json` or GGUF metadata).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Render messages to prompt text.
    ///
    /// Tool-call arguments given as JSON strings (as OpenAI clients send them) are parsed to
    /// objects first, because templates render them with `tojson` when they are mappings.
    pub fn render(&self, input: &RenderInput<'_>) -> Result<String, Error> {
        let messages = input
            .messages
            .iter()
            .map(normalize_message)
            .collect::<Vec<_>>();
        let name = if input.tools.is_some_and(|t| !t.is_empty())
            && self.names.iter().any(|n| n == TOOL_USE_NAME)
        {
            TOOL_USE_NAME
        } else {
            DEFAULT_NAME
        };
        let template = self
            .env
            .get_template(name)
            .map_err(|e| Error::Template(format!("{e:#}")))?;

        let mut context: HashMap<String, Value> = HashMap::new();
        if let Some(kwargs) = input.kwargs {
            for (key, value) in kwargs {
                context.insert(key.clone(), Value::from_serialize(value));
            }
        }
        // The fixed names win over kwargs: a client must not be able to replace `messages`.
        context.insert("messages".into(), Value::from_serialize(&messages));
        context.insert(
            "tools".into(),
            match input.tools {
                Some(tools) if !tools.is_empty() => Value::from_serialize(tools),
                _ => Value::from(()),
            },
        );
        context.insert(
            "add_generation_prompt".into(),
            Value::from(input.add_generation_prompt),
        );
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token".into(), Value::from(bos.clone()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token".into(), Value::from(eos.clone()));
        }
        template.render(context).map_err(|e| {
            if e.kind() == ErrorKind::InvalidOperation && e.detail().is_some() {
                // `raise_exception` from the template: the message is for the client.
                Error::TemplateRejected(e.detail().unwrap_or_default().to_owned())
            } else {
                Error::Template(format!("{e:#}"))
            }
        })
    }
}

/// `bos_token`/`eos_token` in `tokenizer_config.json` are strings or `{"content": ...}` objects.
fn special_token(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// The prefix of the attribution line Claude Code puts in its system prompt; its value
/// changes on every request (version and a per-request hash).
const BILLING_HEADER: &str = "x-anthropic-billing-header:";

/// Remove Claude Code's `x-anthropic-billing-header: …` lines from a system text. The line
/// is meaningless to a local model and, changing per request, would make two consecutive
/// requests differ in their first tokens, so the prefix cache could never reuse the (long)
/// rest of the system prompt. Done here, at rendering, so every surface (OpenAI passthrough,
/// translated Anthropic, `/tokenize` behind `count_tokens`) sees the same prompt.
fn strip_billing_header(text: &str) -> Option<String> {
    if !text.contains(BILLING_HEADER) {
        return None;
    }
    let kept: Vec<&str> = text
        .split_inclusive('\n')
        .filter(|line| !line.trim_start().starts_with(BILLING_HEADER))
        .collect();
    Some(kept.concat())
}

/// Normalise a system message's content: billing-header lines removed from a string, and
/// text parts that were only that line dropped from a parts array.
fn normalize_system(message: &mut Json) {
    match message.get_mut("content") {
        Some(Json::String(text)) => {
            if let Some(stripped) = strip_billing_header(text) {
                *text = stripped;
            }
        }
        Some(Json::Array(parts)) => {
            parts.retain_mut(|part| match part.get_mut("text") {
                Some(Json::String(text)) => match strip_billing_header(text) {
                    Some(stripped) if stripped.trim().is_empty() => false,
                    Some(stripped) => {
                        *text = stripped;
                        true
                    }
                    None => true,
                },
                _ => true,
            });
        }
        _ => {}
    }
}

/// Parse string tool-call arguments into objects (when they are valid JSON objects), and
/// strip Claude Code's per-request attribution line from system messages.
fn normalize_message(message: &Json) -> Json {
    let mut message = message.clone();
    if message.get("role").and_then(Json::as_str) == Some("system") {
        normalize_system(&mut message);
    }
    if let Some(calls) = message.get_mut("tool_calls").and_then(Json::as_array_mut) {
        for call in calls {
            let target = if call.get("function").is_some() {
                call.get_mut("function")
            } else {
                Some(call)
            };
            if let Some(args) = target.and_then(|f| f.get_mut("arguments"))
                && let Json::String(text) = args
                && let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(text)
            {
                *args = parsed;
            }
        }
    }
    message
}

/// `raise_exception(msg)`: templates reject invalid conversations with it.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC time in a subset of C `strftime` (what templates use
/// for "Today is …": dates, month and day names, clock time).
fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    Ok(Value::from(format_time(secs, &format)))
}

/// Format seconds since the Unix epoch (UTC) with `%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`.
pub fn format_time(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let weekday = DAYS[(days.rem_euclid(7)) as usize];
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('B') => out.push_str(month_name),
            Some('b') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Howard Hinnant's `civil_from_days`: (year, month 1..=12, day 1..=31).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson(indent=None)` as transformers defines it: `json.dumps(x, ensure_ascii=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted for compatibility; keys are emitted in their given order either way unless asked.
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys == Some(true) {
        sort_json_keys(&mut json);
    }
    Ok(Value::from_safe_string(python_json(&json, indent)))
}

fn sort_json_keys(value: &mut Json) {
    match value {
        Json::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_json_keys);
        }
        Json::Array(items) => items.iter_mut().for_each(sort_json_keys),
        _ => {}
    }
}

/// Serialise like Python's `json.dumps(value, ensure_ascii=False, indent=indent)`.
pub fn python_json(value: &Json, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_python_json(&mut out, value, indent, 0);
    out
}

fn write_python_json(out: &mut String, value: &Json, indent: Option<usize>, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                out.push_str(&Json::String(key.clone()).to_string());
                out.push_str(": ");
                write_python_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        Json::Number(n) => {
            // Python prints floats with a fraction (`1.0`); serde_json already does.
            out.push_str(&n.to_string());
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_matches_json_dumps() {
        let value: Json =
            serde_json::from_str(r#"{"b": [1, 2.5, "é<"], "a": {}, "c": []}"#).expect("valid json");
        assert_eq!(
            python_json(&value, None),
            r#"{"b": [1, 2.5, "é<"], "a": {}, "c": []}"#
        );
        assert_eq!(
            python_json(&value, Some(2)),
            "{\n  \"b\": [\n    1,\n    2.5,\n    \"é<\"\n  ],\n  \"a\": {},\n  \"c\": []\n}"
        );
    }

    #[test]
    fn format_time_known_dates() {
        // 2024-02-29T13:05:09Z, a Thursday, day 60.
        assert_eq!(
            format_time(1_709_211_909, "%A %a %d %e %B %b %Y %y %m %H:%M:%S %j %%"),
            "Thursday Thu 29 29 February Feb 2024 24 02 13:05:09 060 %"
        );
        assert_eq!(format_time(0, "%d %B %Y"), "01 January 1970");
    }

    #[test]
    fn string_arguments_become_objects() {
        let message: Json = serde_json::from_str(
            r#"{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"{\"x\": 1}"}}]}"#,
        )
        .expect("valid json");
        let normalized = normalize_message(&message);
        assert_eq!(
            normalized["tool_calls"][0]["function"]["arguments"]["x"],
            Json::from(1)
        );
    }

    #[test]
    fn billing_header_lines_are_removed_from_system_messages_only() {
        let a = serde_json::json!({"role": "system", "content":
            "x-anthropic-billing-header: cc_version=2.0.14.a1b; cc_entrypoint=cli; cch=11111;\nYou are Claude Code."});
        let b = serde_json::json!({"role": "system", "content":
            "x-anthropic-billing-header: cc_version=2.0.14.c2d; cc_entrypoint=cli; cch=22222;\nYou are Claude Code."});
        assert_eq!(normalize_message(&a), normalize_message(&b));
        assert_eq!(normalize_message(&a)["content"], "You are Claude Code.");
        // As parts: a part holding only the line is dropped, the others are kept.
        let parts = serde_json::json!({"role": "system", "content": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=1; cch=3;"},
            {"type": "text", "text": "You are Claude Code."}]});
        assert_eq!(
            normalize_message(&parts)["content"],
            serde_json::json!([{"type": "text", "text": "You are Claude Code."}])
        );
        // A user message that quotes the line is left alone.
        let user = serde_json::json!({"role": "user", "content": "x-anthropic-billing-header: x"});
        assert_eq!(normalize_message(&user), user);
    }
}
