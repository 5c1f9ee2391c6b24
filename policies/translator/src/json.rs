//! Small helpers for reading client JSON leniently and failing with messages that name the field.

use serde_json::{Map, Value};

use crate::error::{self, PolicyError};

/// A parsed client request body: a JSON object.
pub(crate) type Object = Map<String, Value>;

/// Parses a client body, which must be a JSON object.
pub(crate) fn parse_object(body: &str) -> Result<Object, PolicyError> {
    let value: Value = serde_json::from_str(body)
        .map_err(|e| error::invalid(format!("request body is not valid JSON: {e}")))?;
    match value {
        Value::Object(object) => Ok(object),
        _ => Err(error::invalid("request body must be a JSON object")),
    }
}

/// Parses the client's original request when rendering a response: it was already accepted
/// once, so a body that does not parse now only loses the echoed fields.
pub(crate) fn parse_object_lenient(body: &str) -> Object {
    match serde_json::from_str(body) {
        Ok(Value::Object(object)) => object,
        _ => Object::new(),
    }
}

/// A required non-empty string field.
pub(crate) fn required_str<'a>(object: &'a Object, field: &str) -> Result<&'a str, PolicyError> {
    object
        .get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            error::invalid(format!(
                "`{field}` is required and must be a non-empty string"
            ))
        })
}

/// An optional field that, when present and not null, must be a string.
pub(crate) fn optional_str<'a>(
    value: Option<&'a Value>,
    field: &str,
) -> Result<Option<&'a str>, PolicyError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(error::invalid(format!("`{field}` must be a string"))),
    }
}

/// An optional numeric field, copied as is (the node validates ranges).
pub(crate) fn copy_number(
    from: &Object,
    field: &str,
    to: &mut Object,
    as_field: &str,
) -> Result<(), PolicyError> {
    match from.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(value @ Value::Number(_)) => {
            to.insert(as_field.to_owned(), value.clone());
            Ok(())
        }
        Some(_) => Err(error::invalid(format!("`{field}` must be a number"))),
    }
}

/// An optional boolean field.
pub(crate) fn optional_bool(object: &Object, field: &str) -> Result<Option<bool>, PolicyError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(error::invalid(format!("`{field}` must be a boolean"))),
    }
}

/// The text of a list of blocks/parts whose `type` is one of `text_types`, joined with `"\n"`;
/// other blocks are skipped (their callers decide whether that is acceptable).
pub(crate) fn join_texts(parts: &[Value], text_types: &[&str]) -> String {
    let texts: Vec<&str> = parts
        .iter()
        .filter(|part| {
            part.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| text_types.contains(&t))
        })
        .filter_map(|part| part.get("text").and_then(Value::as_str))
        .collect();
    texts.join("\n")
}

/// Serialises a value produced by this crate. Only fails on non-string map keys, which
/// `serde_json::Value` cannot hold, so the error arm is defensive.
pub(crate) fn to_string(value: &Value) -> Result<String, PolicyError> {
    serde_json::to_string(value)
        .map_err(|error| PolicyError::Internal(format!("cannot serialise JSON: {error}")))
}

/// Arguments of a tool call as the client surfaces want them (a JSON object). Model output can
/// be malformed; rather than lose it, it is kept verbatim under [`RAW_ARGUMENTS_KEY`].
pub(crate) fn arguments_object(arguments: &str) -> Value {
    if arguments.trim().is_empty() {
        return Value::Object(Object::new());
    }
    match serde_json::from_str::<Value>(arguments) {
        Ok(value @ Value::Object(_)) => value,
        _ => {
            helexa_policy_sdk::log::warn(
                "translator: tool-call arguments are not a JSON object; kept raw",
            );
            let mut object = Object::new();
            object.insert(
                RAW_ARGUMENTS_KEY.to_owned(),
                Value::String(arguments.to_owned()),
            );
            Value::Object(object)
        }
    }
}

/// Key under which unparsable tool-call arguments are passed to Anthropic clients.
pub const RAW_ARGUMENTS_KEY: &str = "_raw_arguments";
