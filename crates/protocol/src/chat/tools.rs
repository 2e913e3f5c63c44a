//! Tool calling on `/v1/chat/completions`: tool definitions, `tool_choice`, the calls a model
//! makes (whole, and as streamed fragments), and their validation.
//!
//! The request keeps `tools` and `tool_choice` as sent (JSON values) so that a malformed one is
//! reported with its exact parameter path; [`parse_tools`] and [`parse_tool_choice`] give the
//! typed view.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDefinition,
}

/// A callable function: name, purpose and JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDefinition {
    /// `[A-Za-z0-9_-]{1,64}`.
    pub name: String,
    /// What the function does (shown to the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments object; absent means no arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Whether the arguments must follow the schema exactly (they always do when the call is
    /// constrained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl Tool {
    /// A function tool.
    pub fn function(
        name: impl Into<String>,
        description: Option<String>,
        parameters: Value,
    ) -> Self {
        Self {
            kind: "function".to_owned(),
            function: FunctionDefinition {
                name: name.into(),
                description,
                parameters: Some(parameters),
                strict: None,
            },
        }
    }

    /// The schema of the arguments (an empty object's schema when none was given).
    pub fn parameters(&self) -> Value {
        self.function
            .parameters
            .clone()
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}))
    }
}

/// Whether and how the model must call a tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call a tool.
    None,
    /// The model decides (the default with tools).
    Auto,
    /// Call at least one tool.
    Required,
    /// Call this function.
    Function(String),
}

impl ToolChoice {
    /// The wire form.
    pub fn to_value(&self) -> Value {
        match self {
            Self::None => Value::from("none"),
            Self::Auto => Value::from("auto"),
            Self::Required => Value::from("required"),
            Self::Function(name) => {
                serde_json::json!({"type": "function", "function": {"name": name}})
            }
        }
    }
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Call id, echoed back in the `tool` message carrying the result.
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Which function, with which arguments.
    pub function: FunctionCall,
}

/// The function and arguments of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON text.
    pub arguments: String,
}

impl ToolCall {
    /// A function call.
    pub fn new(
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            kind: "function".to_owned(),
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        }
    }
}

/// A fragment of a tool call in a stream; fragments with one `index` concatenate to one call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which call of the message this belongs to.
    pub index: u32,
    /// Set on a call's first fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `"function"`, on a call's first fragment.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name (first fragment) and a piece of the arguments text.
    pub function: FunctionCallDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    /// Set on a call's first fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The next piece of the arguments text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl ToolCallDelta {
    /// The first fragment of call `index`: id, type and name, arguments still empty.
    pub fn start(index: u32, id: &str, name: &str) -> Self {
        Self {
            index,
            id: Some(id.to_owned()),
            kind: Some("function".to_owned()),
            function: FunctionCallDelta {
                name: Some(name.to_owned()),
                arguments: Some(String::new()),
            },
        }
    }

    /// A piece of call `index`'s arguments.
    pub fn arguments(index: u32, text: impl Into<String>) -> Self {
        Self {
            index,
            id: None,
            kind: None,
            function: FunctionCallDelta {
                name: None,
                arguments: Some(text.into()),
            },
        }
    }
}

fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The typed tools of a request; errors name the offending `tools[i]` field.
pub fn parse_tools(tools: &[Value]) -> Result<Vec<Tool>, ApiError> {
    let mut out: Vec<Tool> = Vec::with_capacity(tools.len());
    for (i, raw) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        let tool: Tool = serde_json::from_value(raw.clone()).map_err(|e| {
            ApiError::invalid_request(
                format!("{param} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": {{...}}}}}}: {e}"),
                Some(&param),
            )
        })?;
        if tool.kind != "function" {
            return Err(ApiError::invalid_request(
                format!("{param}.type must be \"function\", got {:?}", tool.kind),
                Some(&format!("{param}.type")),
            ));
        }
        let name = &tool.function.name;
        if !is_valid_name(name) {
            return Err(ApiError::invalid_request(
                format!(
                    "{param}.function.name must be 1 to 64 letters, digits, underscores or \
                     dashes, got {name:?}"
                ),
                Some(&format!("{param}.function.name")),
            ));
        }
        if out.iter().any(|t| &t.function.name == name) {
            return Err(ApiError::invalid_request(
                format!("{param}.function.name {name:?} is defined twice"),
                Some(&format!("{param}.function.name")),
            ));
        }
        if let Some(p) = &tool.function.parameters {
            if !p.is_object() {
                return Err(ApiError::invalid_request(
                    format!("{param}.function.parameters must be a JSON Schema object, got {p}"),
                    Some(&format!("{param}.function.parameters")),
                ));
            }
        }
        out.push(tool);
    }
    Ok(out)
}

/// The typed `tool_choice`, checked against the tools (`None` when absent).
pub fn parse_tool_choice(choice: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
    let param = Some("tool_choice");
    let parsed = match choice {
        None | Some(Value::Null) => {
            return Ok(if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            })
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid_request(
                    format!(
                        "tool_choice must be \"none\", \"auto\", \"required\" or \
                         {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {other:?}"
                    ),
                    param,
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid_request(
                        format!(
                            "tool_choice must be \"none\", \"auto\", \"required\" or \
                             {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {v}"
                        ),
                        param,
                    )
                })?;
            ToolChoice::Function(name.to_owned())
        }
    };
    match &parsed {
        ToolChoice::Required if tools.is_empty() => Err(ApiError::invalid_request(
            "tool_choice \"required\" needs at least one tool in tools",
            param,
        )),
        ToolChoice::Function(name) if !tools.iter().any(|t| &t.function.name == name) => {
            Err(ApiError::invalid_request(
                format!("tool_choice names function {name:?}, which is not in tools"),
                param,
            ))
        }
        _ => Ok(parsed),
    }
}

/// The typed `tool_calls` of an assistant message; errors name `messages[i].tool_calls`.
pub fn parse_tool_calls(calls: &[Value], message_index: usize) -> Result<Vec<ToolCall>, ApiError> {
    calls
        .iter()
        .enumerate()
        .map(|(j, raw)| {
            serde_json::from_value::<ToolCall>(raw.clone()).map_err(|e| {
                let param = format!("messages[{message_index}].tool_calls[{j}]");
                ApiError::invalid_request(
                    format!(
                        "{param} must be {{\"id\": ..., \"type\": \"function\", \"function\": \
                         {{\"name\": ..., \"arguments\": \"...\"}}}}: {e}"
                    ),
                    Some(&param),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}})
    }

    #[test]
    fn tools_parse_and_bad_ones_name_their_field() {
        let tools = parse_tools(&[weather()]).expect("valid");
        assert_eq!(tools[0].function.name, "get_weather");
        let cases = [
            (json!({"type": "function"}), "tools[0]"),
            (
                json!({"type": "code", "function": {"name": "a"}}),
                "tools[0].type",
            ),
            (
                json!({"type": "function", "function": {"name": "a b"}}),
                "tools[0].function.name",
            ),
            (
                json!({"type": "function", "function": {"name": "a", "parameters": 3}}),
                "tools[0].function.parameters",
            ),
        ];
        for (bad, param) in cases {
            let err = parse_tools(&[bad]).expect_err("invalid");
            assert_eq!(err.param.as_deref(), Some(param), "{}", err.message);
        }
        let err = parse_tools(&[weather(), weather()]).expect_err("duplicate");
        assert!(err.message.contains("twice"), "{}", err.message);
    }

    #[test]
    fn tool_choice_forms() {
        let tools = parse_tools(&[weather()]).expect("valid");
        assert_eq!(
            parse_tool_choice(None, &tools).expect("ok"),
            ToolChoice::Auto
        );
        assert_eq!(parse_tool_choice(None, &[]).expect("ok"), ToolChoice::None);
        assert_eq!(
            parse_tool_choice(Some(&json!("required")), &tools).expect("ok"),
            ToolChoice::Required
        );
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let choice = parse_tool_choice(Some(&named), &tools).expect("ok");
        assert_eq!(choice, ToolChoice::Function("get_weather".into()));
        assert_eq!(choice.to_value(), named);
        for bad in [
            json!("sometimes"),
            json!({"type": "function", "function": {"name": "nope"}}),
            json!({"function": {"name": "get_weather"}}),
        ] {
            let err = parse_tool_choice(Some(&bad), &tools).expect_err("invalid");
            assert_eq!(err.param.as_deref(), Some("tool_choice"));
        }
        assert!(parse_tool_choice(Some(&json!("required")), &[]).is_err());
    }

    #[test]
    fn deltas_serialize_like_openai() {
        assert_eq!(
            serde_json::to_value(ToolCallDelta::start(0, "call_1", "f")).expect("json"),
            json!({"index": 0, "id": "call_1", "type": "function",
                   "function": {"name": "f", "arguments": ""}})
        );
        assert_eq!(
            serde_json::to_value(ToolCallDelta::arguments(1, "{}")).expect("json"),
            json!({"index": 1, "function": {"arguments": "{}"}})
        );
        let calls = parse_tool_calls(
            &[json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}})],
            2,
        )
        .expect("valid");
        assert_eq!(calls[0], ToolCall::new("c", "f", "{}"));
        let err = parse_tool_calls(&[json!({"id": "c"})], 2).expect_err("invalid");
        assert_eq!(err.param.as_deref(), Some("messages[2].tool_calls[0]"));
    }
}
