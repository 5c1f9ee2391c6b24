//! Anthropic Messages request → OpenAI chat completions request.

use serde_json::{Value, json};

use crate::error::{self, PolicyError};
use crate::json::{self, Object};
use helexa_policy_sdk::log;

/// Translates a `POST /v1/messages` body into a chat completions body.
///
/// Unknown fields are ignored; missing or malformed required fields (`model`, `messages`,
/// `max_tokens`) and malformed known fields are [`PolicyError::InvalidInput`] naming the field.
pub fn to_chat(body: &str) -> Result<String, PolicyError> {
    let request = json::parse_object(body)?;
    let model = json::required_str(&request, "model")?;
    let max_tokens = request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .filter(|n| *n > 0)
        .ok_or_else(|| error::invalid("`max_tokens` is required and must be a positive integer"))?;
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| error::invalid("`messages` is required and must be an array"))?;

    let mut chat_messages = Vec::new();
    if let Some(system) = system_text(request.get("system"))? {
        chat_messages.push(json!({"role": "system", "content": system}));
    }
    for (i, message) in messages.iter().enumerate() {
        convert_message(i, message, &mut chat_messages)?;
    }

    let mut chat = Object::new();
    chat.insert("model".into(), model.into());
    chat.insert("messages".into(), Value::Array(chat_messages));
    chat.insert("max_tokens".into(), max_tokens.into());
    json::copy_number(&request, "temperature", &mut chat, "temperature")?;
    json::copy_number(&request, "top_p", &mut chat, "top_p")?;
    json::copy_number(&request, "top_k", &mut chat, "top_k")?;
    if let Some(stops) = stop_sequences(&request)? {
        chat.insert("stop".into(), stops.into());
    }
    if json::optional_bool(&request, "stream")? == Some(true) {
        chat.insert("stream".into(), true.into());
        // Continuous usage stats (vLLM's extension, served by helexa nodes) put the prompt size
        // in the first chunk, in time for `message_start`; other servers ignore the key.
        chat.insert(
            "stream_options".into(),
            json!({"include_usage": true, "continuous_usage_stats": true}),
        );
    }
    tools(&request, &mut chat)?;
    tool_choice(&request, &mut chat)?;
    thinking(&request, &mut chat)?;
    if let Some(user) = request
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
    {
        chat.insert("user".into(), user.into());
    }
    json::to_string(&Value::Object(chat))
}

/// `stop_sequences` of a request (also used to tell `stop_sequence` from `end_turn`).
pub(crate) fn stop_sequences(request: &Object) -> Result<Option<Vec<String>>, PolicyError> {
    match request.get("stop_sequences") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| error::invalid("`stop_sequences` must be an array of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| if v.is_empty() { None } else { Some(v) }),
        Some(_) => Err(error::invalid(
            "`stop_sequences` must be an array of strings",
        )),
    }
}

/// `system` as a string or text blocks, merged into one text (blocks joined with `"\n"`).
fn system_text(system: Option<&Value>) -> Result<Option<String>, PolicyError> {
    match system {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone()).filter(|t| !t.is_empty())),
        Some(Value::Array(blocks)) => {
            for (j, block) in blocks.iter().enumerate() {
                if block.get("type").and_then(Value::as_str) != Some("text")
                    || !block.get("text").is_some_and(Value::is_string)
                {
                    return Err(error::invalid(format!(
                        "`system[{j}]` must be a text block"
                    )));
                }
            }
            Ok(Some(json::join_texts(blocks, &["text"])).filter(|t| !t.is_empty()))
        }
        Some(_) => Err(error::invalid(
            "`system` must be a string or an array of text blocks",
        )),
    }
}

fn convert_message(i: usize, message: &Value, out: &mut Vec<Value>) -> Result<(), PolicyError> {
    let role = message
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| error::invalid(format!("`messages[{i}].role` is required")))?;
    let content = message
        .get("content")
        .ok_or_else(|| error::invalid(format!("`messages[{i}].content` is required")))?;
    let blocks = match content {
        Value::String(text) => {
            out.push(json!({"role": role_checked(i, role)?, "content": text}));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => {
            return Err(error::invalid(format!(
                "`messages[{i}].content` must be a string or an array of content blocks"
            )));
        }
    };
    match role_checked(i, role)? {
        "user" => convert_user(i, blocks, out),
        _ => convert_assistant(i, blocks, out),
    }
}

fn role_checked(i: usize, role: &str) -> Result<&str, PolicyError> {
    match role {
        "user" | "assistant" => Ok(role),
        _ => Err(error::invalid(format!(
            "`messages[{i}].role` must be \"user\" or \"assistant\""
        ))),
    }
}

fn block_type(i: usize, j: usize, block: &Value) -> Result<&str, PolicyError> {
    block
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| error::invalid(format!("`messages[{i}].content[{j}].type` is required")))
}

fn block_text(i: usize, j: usize, block: &Value) -> Result<String, PolicyError> {
    block
        .get("text")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| {
            error::invalid(format!(
                "`messages[{i}].content[{j}].text` must be a string"
            ))
        })
}

/// A user turn: tool results become `tool` messages (first, because chat requires them right
/// after the assistant's calls), everything else one user message after them.
fn convert_user(i: usize, blocks: &[Value], out: &mut Vec<Value>) -> Result<(), PolicyError> {
    let mut parts = Vec::new();
    let mut tool_messages = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        match block_type(i, j, block)? {
            "text" => parts.push(json!({"type": "text", "text": block_text(i, j, block)?})),
            "image" => parts.push(image_part(&format!("messages[{i}].content[{j}]"), block)?),
            "tool_result" => {
                let (message, images) = tool_result(i, j, block)?;
                tool_messages.push(message);
                parts.extend(images);
            }
            "document" => match document_text(block) {
                Some(text) => parts.push(json!({"type": "text", "text": text})),
                None => log::warn("translator: dropped a non-text document block"),
            },
            other => log::warn(&format!("translator: dropped a user `{other}` block")),
        }
    }
    let had_tool_results = !tool_messages.is_empty();
    out.extend(tool_messages);
    if !parts.is_empty() || !had_tool_results {
        out.push(json!({"role": "user", "content": user_content(parts)}));
    }
    Ok(())
}

/// A single text part stays a plain string (what every chat template understands); anything
/// richer stays a list of parts.
fn user_content(mut parts: Vec<Value>) -> Value {
    let only_text =
        parts.len() == 1 && parts[0].get("type").and_then(Value::as_str) == Some("text");
    if only_text {
        parts
            .swap_remove(0)
            .get_mut("text")
            .map(Value::take)
            .unwrap_or_default()
    } else if parts.is_empty() {
        Value::String(String::new())
    } else {
        Value::Array(parts)
    }
}

fn image_part(field: &str, block: &Value) -> Result<Value, PolicyError> {
    let source = block
        .get("source")
        .filter(|s| s.is_object())
        .ok_or_else(|| error::invalid(format!("`{field}.source` is required")))?;
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media_type = source
                .get("media_type")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    error::invalid(format!("`{field}.source.media_type` is required"))
                })?;
            let data = source
                .get("data")
                .and_then(Value::as_str)
                .ok_or_else(|| error::invalid(format!("`{field}.source.data` is required")))?;
            format!("data:{media_type};base64,{data}")
        }
        Some("url") => source
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| error::invalid(format!("`{field}.source.url` is required")))?
            .to_owned(),
        _ => {
            return Err(error::invalid(format!(
                "`{field}.source.type` must be \"base64\" or \"url\""
            )));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// A plain-text document (`source.type: "text"`) is just more prompt text; PDFs and files
/// need a parser this gateway does not have.
fn document_text(block: &Value) -> Option<String> {
    let source = block.get("source")?;
    match source.get("type").and_then(Value::as_str)? {
        "text" => source
            .get("data")
            .and_then(Value::as_str)
            .map(str::to_owned),
        "content" => match source.get("content")? {
            Value::String(text) => Some(text.clone()),
            Value::Array(blocks) => Some(json::join_texts(blocks, &["text"])),
            _ => None,
        },
        _ => None,
    }
}

/// A `tool_result` block → a `tool` message, plus any images it carried (chat tool messages
/// hold text only, so images travel in the following user message).
fn tool_result(i: usize, j: usize, block: &Value) -> Result<(Value, Vec<Value>), PolicyError> {
    let field = format!("messages[{i}].content[{j}]");
    let id = block
        .get("tool_use_id")
        .and_then(Value::as_str)
        .ok_or_else(|| error::invalid(format!("`{field}.tool_use_id` is required")))?;
    let mut images = Vec::new();
    let mut text = match block.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) => {
            for (k, item) in items.iter().enumerate() {
                if item.get("type").and_then(Value::as_str) == Some("image") {
                    images.push(image_part(&format!("{field}.content[{k}]"), item)?);
                }
            }
            json::join_texts(items, &["text"])
        }
        Some(_) => {
            return Err(error::invalid(format!(
                "`{field}.content` must be a string or an array of blocks"
            )));
        }
    };
    // Chat has no error flag on tool messages; the model still needs to know the call failed.
    if block.get("is_error").and_then(Value::as_bool) == Some(true) {
        text = if text.is_empty() {
            "Error".to_owned()
        } else {
            format!("Error: {text}")
        };
    }
    Ok((
        json!({"role": "tool", "tool_call_id": id, "content": text}),
        images,
    ))
}

fn convert_assistant(i: usize, blocks: &[Value], out: &mut Vec<Value>) -> Result<(), PolicyError> {
    let mut texts = Vec::new();
    let mut reasoning = Vec::new();
    let mut tool_calls = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        match block_type(i, j, block)? {
            "text" => texts.push(block_text(i, j, block)?),
            "thinking" => {
                if let Some(thinking) = block.get("thinking").and_then(Value::as_str) {
                    reasoning.push(thinking.to_owned());
                }
            }
            "tool_use" => {
                let field = format!("messages[{i}].content[{j}]");
                let id = block
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| error::invalid(format!("`{field}.id` is required")))?;
                let name = block
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| error::invalid(format!("`{field}.name` is required")))?;
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                let arguments = match input.get(json::RAW_ARGUMENTS_KEY).and_then(Value::as_str) {
                    // Our own fallback for malformed arguments: give the model back what it wrote.
                    Some(raw) if input.as_object().is_some_and(|o| o.len() == 1) => raw.to_owned(),
                    _ => json::to_string(&input)?,
                };
                tool_calls.push(json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }));
            }
            // Redacted thinking is opaque to every model but Claude.
            other => log::debug(&format!("translator: dropped an assistant `{other}` block")),
        }
    }
    let mut message = Object::new();
    message.insert("role".into(), "assistant".into());
    let content = texts.join("\n");
    message.insert(
        "content".into(),
        if content.is_empty() && !tool_calls.is_empty() {
            Value::Null
        } else {
            content.into()
        },
    );
    if !reasoning.is_empty() {
        message.insert("reasoning_content".into(), reasoning.join("\n").into());
    }
    if !tool_calls.is_empty() {
        message.insert("tool_calls".into(), tool_calls.into());
    }
    out.push(Value::Object(message));
    Ok(())
}

fn tools(request: &Object, chat: &mut Object) -> Result<(), PolicyError> {
    let tools = match request.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(error::invalid("`tools` must be an array")),
    };
    let mut functions = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        // Server tools (web search, bash, …) have versioned types; only client tools (no type, or
        // `custom`) can be run by the client, so only they reach the model.
        match tool.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(other) => {
                log::warn(&format!(
                    "translator: ignored the Anthropic server tool `{other}`"
                ));
                continue;
            }
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
        let parameters = match tool.get("input_schema") {
            Some(schema @ Value::Object(_)) => schema.clone(),
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(_) => {
                return Err(error::invalid(format!(
                    "`tools[{i}].input_schema` must be an object"
                )));
            }
        };
        function.insert("parameters".into(), parameters);
        functions.push(json!({"type": "function", "function": function}));
    }
    if !functions.is_empty() {
        chat.insert("tools".into(), functions.into());
    }
    Ok(())
}

fn tool_choice(request: &Object, chat: &mut Object) -> Result<(), PolicyError> {
    let choice = match request.get("tool_choice") {
        None | Some(Value::Null) => return Ok(()),
        Some(choice @ Value::Object(_)) => choice,
        Some(_) => return Err(error::invalid("`tool_choice` must be an object")),
    };
    let mapped = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice.get("name").and_then(Value::as_str).ok_or_else(|| {
                error::invalid("`tool_choice.name` is required for type \"tool\"")
            })?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(error::invalid(
                "`tool_choice.type` must be one of \"auto\", \"any\", \"tool\", \"none\"",
            ));
        }
    };
    chat.insert("tool_choice".into(), mapped);
    if choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        == Some(true)
    {
        chat.insert("parallel_tool_calls".into(), false.into());
    }
    Ok(())
}

/// Extended thinking maps onto the chat template switch of open reasoning models; the budget
/// has no chat counterpart (the node bounds the whole answer by `max_tokens`).
fn thinking(request: &Object, chat: &mut Object) -> Result<(), PolicyError> {
    let enable = match request.get("thinking") {
        None | Some(Value::Null) => return Ok(()),
        Some(thinking) => match thinking.get("type").and_then(Value::as_str) {
            Some("enabled" | "adaptive") => true,
            Some("disabled") => false,
            _ => {
                return Err(error::invalid(
                    "`thinking.type` must be \"enabled\" or \"disabled\"",
                ));
            }
        },
    };
    chat.insert(
        "chat_template_kwargs".into(),
        json!({"enable_thinking": enable}),
    );
    Ok(())
}
