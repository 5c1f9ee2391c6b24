//! OpenAI Responses request → OpenAI chat completions request.

use serde_json::{Value, json};

use crate::error::{self, PolicyError};
use crate::json::{self, Object};
use helexa_policy_sdk::log;

/// Translates a `POST /v1/responses` body into a chat completions body.
///
/// Unknown fields are ignored. `previous_response_id` and `item_reference` items are refused:
/// they point at server-side state this gateway does not keep, and silently dropping them would
/// answer a different conversation than the client meant.
pub fn to_chat(body: &str) -> Result<String, PolicyError> {
    let request = json::parse_object(body)?;
    let model = json::required_str(&request, "model")?;
    if request
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(error::invalid(
            "`previous_response_id` is not supported: this gateway does not store responses; send the whole conversation in `input`",
        ));
    }
    if request.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(error::invalid(
            "`conversation` is not supported: this gateway does not store conversations; send the whole conversation in `input`",
        ));
    }

    let mut messages = Messages::default();
    if let Some(instructions) = json::optional_str(request.get("instructions"), "instructions")? {
        messages.system(instructions.to_owned());
    }
    match request.get("input") {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                convert_item(i, item, &mut messages)?;
            }
        }
        Some(_) => {
            return Err(error::invalid(
                "`input` must be a string or an array of items",
            ));
        }
    }
    let messages = messages.finish();
    if messages.is_empty() {
        return Err(error::invalid("`input` is required"));
    }

    let mut chat = Object::new();
    chat.insert("model".into(), model.into());
    chat.insert("messages".into(), Value::Array(messages));
    json::copy_number(&request, "max_output_tokens", &mut chat, "max_tokens")?;
    json::copy_number(&request, "temperature", &mut chat, "temperature")?;
    json::copy_number(&request, "top_p", &mut chat, "top_p")?;
    json::copy_number(&request, "top_logprobs", &mut chat, "top_logprobs")?;
    if let Some(parallel) = json::optional_bool(&request, "parallel_tool_calls")? {
        chat.insert("parallel_tool_calls".into(), parallel.into());
    }
    if json::optional_bool(&request, "stream")? == Some(true) {
        chat.insert("stream".into(), true.into());
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    tools(&request, &mut chat)?;
    tool_choice(&request, &mut chat)?;
    reasoning(&request, &mut chat)?;
    text_format(&request, &mut chat)?;
    let user = json::optional_str(request.get("safety_identifier"), "safety_identifier")?
        .or(json::optional_str(request.get("user"), "user")?);
    if let Some(user) = user {
        chat.insert("user".into(), user.into());
    }
    json::to_string(&Value::Object(chat))
}

/// Chat messages under construction.
///
/// Keeps system text first (chat templates of open models reject a system message elsewhere),
/// groups consecutive function calls into one assistant message, and carries reasoning items
/// over to the assistant message that follows them.
#[derive(Default)]
struct Messages {
    system: Vec<String>,
    /// True once a non-system message was added: later system text stays in place.
    started: bool,
    messages: Vec<Value>,
    reasoning: Vec<String>,
    /// `messages` ends with an assistant message that holds only tool calls so far.
    open_calls: bool,
}

impl Messages {
    fn system(&mut self, text: String) {
        if self.started {
            self.push(json!({"role": "system", "content": text}));
        } else if !text.is_empty() {
            self.system.push(text);
        }
    }

    fn push(&mut self, mut message: Value) {
        self.started = true;
        self.open_calls = false;
        if message.get("role").and_then(Value::as_str) == Some("assistant") {
            self.attach_reasoning(&mut message);
        } else if !self.reasoning.is_empty() {
            // Reasoning belongs to the model turn right after it; one that does not follow
            // has no assistant message to ride on.
            log::debug("translator: dropped a reasoning item not followed by an assistant turn");
            self.reasoning.clear();
        }
        self.messages.push(message);
    }

    fn attach_reasoning(&mut self, message: &mut Value) {
        if !self.reasoning.is_empty()
            && let Some(object) = message.as_object_mut()
        {
            object.insert("reasoning_content".into(), self.reasoning.join("\n").into());
            self.reasoning.clear();
        }
    }

    fn call(&mut self, call: Value) {
        if !self.open_calls {
            // A model turn with text and calls comes back as a message item followed by
            // function_call items; in chat it was one assistant message, so it becomes one again.
            let text_turn = self.messages.last_mut().filter(|m| {
                m.get("role").and_then(Value::as_str) == Some("assistant")
                    && m.get("tool_calls").is_none()
            });
            match text_turn {
                Some(message) if self.reasoning.is_empty() => {
                    message["tool_calls"] = json!([]);
                }
                _ => self.push(json!({"role": "assistant", "content": null, "tool_calls": []})),
            }
            self.open_calls = true;
        }
        if let Some(calls) = self
            .messages
            .last_mut()
            .and_then(|m| m.get_mut("tool_calls"))
            .and_then(Value::as_array_mut)
        {
            calls.push(call);
        }
    }

    fn finish(self) -> Vec<Value> {
        let mut out = Vec::with_capacity(self.messages.len() + 1);
        if !self.system.is_empty() {
            out.push(json!({"role": "system", "content": self.system.join("\n")}));
        }
        out.extend(self.messages);
        out
    }
}

fn convert_item(i: usize, item: &Value, messages: &mut Messages) -> Result<(), PolicyError> {
    if !item.is_object() {
        return Err(error::invalid(format!("`input[{i}]` must be an object")));
    }
    // Easy input messages (`{role, content}`) may omit `type`.
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    match kind {
        "message" => message_item(i, item, messages),
        "function_call" => {
            let call_id = item_str(i, item, "call_id")?;
            let name = item_str(i, item, "name")?;
            let arguments = item
                .get("arguments")
                .and_then(Value::as_str)
                .unwrap_or("{}");
            messages.call(json!({
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }));
            Ok(())
        }
        "function_call_output" => {
            let call_id = item_str(i, item, "call_id")?;
            let (text, images) = match item.get("output") {
                Some(Value::String(text)) => (text.clone(), Vec::new()),
                Some(Value::Array(parts)) => {
                    let mut images = Vec::new();
                    for (k, part) in parts.iter().enumerate() {
                        if part.get("type").and_then(Value::as_str) == Some("input_image") {
                            images.push(image_part(&format!("input[{i}].output[{k}]"), part)?);
                        }
                    }
                    (
                        json::join_texts(parts, &["input_text", "output_text"]),
                        images,
                    )
                }
                _ => {
                    return Err(error::invalid(format!(
                        "`input[{i}].output` must be a string or an array of content parts"
                    )));
                }
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": text}));
            if !images.is_empty() {
                // Chat tool messages hold text only.
                messages.push(json!({"role": "user", "content": images}));
            }
            Ok(())
        }
        "reasoning" => {
            // Raw reasoning text if the client kept it, else the summary.
            let content = item
                .get("content")
                .and_then(Value::as_array)
                .map(|parts| json::join_texts(parts, &["reasoning_text"]))
                .unwrap_or_default();
            let text = if content.is_empty() {
                item.get("summary")
                    .and_then(Value::as_array)
                    .map(|parts| json::join_texts(parts, &["summary_text"]))
                    .unwrap_or_default()
            } else {
                content
            };
            if !text.is_empty() {
                messages.reasoning.push(text);
            }
            Ok(())
        }
        "item_reference" => Err(error::invalid(format!(
            "`input[{i}]`: item references are not supported; this gateway does not store items"
        ))),
        other => {
            log::warn(&format!(
                "translator: dropped a Responses `{other}` input item"
            ));
            Ok(())
        }
    }
}

fn item_str<'a>(i: usize, item: &'a Value, field: &str) -> Result<&'a str, PolicyError> {
    item.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| error::invalid(format!("`input[{i}].{field}` is required")))
}

fn message_item(i: usize, item: &Value, messages: &mut Messages) -> Result<(), PolicyError> {
    let role = item_str(i, item, "role")?;
    let content = item
        .get("content")
        .ok_or_else(|| error::invalid(format!("`input[{i}].content` is required")))?;
    let parts: Vec<Value> = match content {
        Value::String(text) => vec![json!({"type": "text", "text": text})],
        Value::Array(parts) => {
            let mut out = Vec::new();
            for (k, part) in parts.iter().enumerate() {
                let field = format!("input[{i}].content[{k}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        let text = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                            error::invalid(format!("`{field}.text` must be a string"))
                        })?;
                        out.push(json!({"type": "text", "text": text}));
                    }
                    Some("input_image") => out.push(image_part(&field, part)?),
                    Some("refusal") => {
                        if let Some(text) = part.get("refusal").and_then(Value::as_str) {
                            out.push(json!({"type": "text", "text": text}));
                        }
                    }
                    Some(other) => {
                        log::warn(&format!("translator: dropped a `{other}` content part"))
                    }
                    None => {
                        return Err(error::invalid(format!("`{field}.type` is required")));
                    }
                }
            }
            out
        }
        _ => {
            return Err(error::invalid(format!(
                "`input[{i}].content` must be a string or an array of content parts"
            )));
        }
    };
    match role {
        "system" | "developer" => {
            messages.system(json::join_texts(&parts, &["text"]));
        }
        "user" => messages.push(json!({"role": "user", "content": user_content(parts)})),
        "assistant" => messages.push(json!({
            "role": "assistant",
            "content": json::join_texts(&parts, &["text"]),
        })),
        _ => {
            return Err(error::invalid(format!(
                "`input[{i}].role` must be one of \"user\", \"assistant\", \"system\", \"developer\""
            )));
        }
    }
    Ok(())
}

/// One text part stays a plain string; anything richer stays a list of parts.
fn user_content(parts: Vec<Value>) -> Value {
    match parts.as_slice() {
        [only] if only.get("type").and_then(Value::as_str) == Some("text") => {
            only.get("text").cloned().unwrap_or_default()
        }
        _ => Value::Array(parts),
    }
}

fn image_part(field: &str, part: &Value) -> Result<Value, PolicyError> {
    let url = part
        .get("image_url")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            error::invalid(format!(
                "`{field}.image_url` is required (file ids are not supported)"
            ))
        })?;
    let mut image_url = json!({"url": url});
    if let Some(detail) = part.get("detail").and_then(Value::as_str) {
        image_url["detail"] = detail.into();
    }
    Ok(json!({"type": "image_url", "image_url": image_url}))
}

fn tools(request: &Object, chat: &mut Object) -> Result<(), PolicyError> {
    let tools = match request.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(error::invalid("`tools` must be an array")),
    };
    let mut functions = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                // Hosted tools (web search, file search, computer use, MCP …) run on OpenAI's side.
                log::warn(&format!(
                    "translator: ignored the Responses tool type `{other}`"
                ));
                continue;
            }
            None => return Err(error::invalid(format!("`tools[{i}].type` is required"))),
        }
        let name = tool
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| error::invalid(format!("`tools[{i}].name` is required")))?;
        let mut function = Object::new();
        function.insert("name".into(), name.into());
        if let Some(description) =
            json::optional_str(tool.get("description"), &format!("tools[{i}].description"))?
        {
            function.insert("description".into(), description.into());
        }
        let parameters = match tool.get("parameters") {
            Some(schema @ Value::Object(_)) => schema.clone(),
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(_) => {
                return Err(error::invalid(format!(
                    "`tools[{i}].parameters` must be an object"
                )));
            }
        };
        function.insert("parameters".into(), parameters);
        if let Some(strict) = tool.get("strict").and_then(Value::as_bool) {
            function.insert("strict".into(), strict.into());
        }
        functions.push(json!({"type": "function", "function": function}));
    }
    if !functions.is_empty() {
        chat.insert("tools".into(), functions.into());
    }
    Ok(())
}

fn tool_choice(request: &Object, chat: &mut Object) -> Result<(), PolicyError> {
    let mapped = match request.get("tool_choice") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" | "none" | "required" => json!(mode),
            _ => {
                return Err(error::invalid(
                    "`tool_choice` must be \"auto\", \"none\", \"required\" or an object",
                ));
            }
        },
        Some(choice @ Value::Object(_)) => match choice.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = choice.get("name").and_then(Value::as_str).ok_or_else(|| {
                    error::invalid("`tool_choice.name` is required for type \"function\"")
                })?;
                json!({"type": "function", "function": {"name": name}})
            }
            // `allowed_tools` restricts the set; its mode is the closest chat equivalent.
            Some("allowed_tools") => match choice.get("mode").and_then(Value::as_str) {
                Some("required") => json!("required"),
                _ => json!("auto"),
            },
            other => {
                log::warn(&format!(
                    "translator: ignored tool_choice of type `{}`",
                    other.unwrap_or("?")
                ));
                return Ok(());
            }
        },
        Some(_) => {
            return Err(error::invalid(
                "`tool_choice` must be a string or an object",
            ));
        }
    };
    chat.insert("tool_choice".into(), mapped);
    Ok(())
}

fn reasoning(request: &Object, chat: &mut Object) -> Result<(), PolicyError> {
    let Some(effort) = request
        .get("reasoning")
        .and_then(|r| r.get("effort"))
        .filter(|e| !e.is_null())
    else {
        return Ok(());
    };
    let enable = match effort.as_str() {
        Some("none" | "minimal") => false,
        Some(_) => true,
        None => return Err(error::invalid("`reasoning.effort` must be a string")),
    };
    chat.insert(
        "chat_template_kwargs".into(),
        json!({"enable_thinking": enable}),
    );
    Ok(())
}

fn text_format(request: &Object, chat: &mut Object) -> Result<(), PolicyError> {
    let Some(format) = request
        .get("text")
        .and_then(|t| t.get("format"))
        .filter(|f| !f.is_null())
    else {
        return Ok(());
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => {}
        Some("json_object") => {
            chat.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some("json_schema") => {
            let name = format.get("name").and_then(Value::as_str).ok_or_else(|| {
                error::invalid("`text.format.name` is required for type \"json_schema\"")
            })?;
            let schema = format
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    error::invalid("`text.format.schema` is required for type \"json_schema\"")
                })?;
            let mut json_schema = Object::new();
            json_schema.insert("name".into(), name.into());
            json_schema.insert("schema".into(), schema.clone());
            for field in ["description", "strict"] {
                if let Some(value) = format.get(field).filter(|v| !v.is_null()) {
                    json_schema.insert(field.into(), value.clone());
                }
            }
            chat.insert(
                "response_format".into(),
                json!({"type": "json_schema", "json_schema": json_schema}),
            );
        }
        _ => {
            return Err(error::invalid(
                "`text.format.type` must be \"text\", \"json_object\" or \"json_schema\"",
            ));
        }
    }
    Ok(())
}
