//! Validation of Anthropic requests. Every error is an invalid-request [`AnthropicError`] whose
//! message starts with the path of the field at fault in Anthropic's dotted style
//! (`messages.2.content.0.tool_use_id: ...`).
//!
//! Invariants a validated request gives the conversion: the first message is `user`; blocks
//! are text, `tool_use` (assistant only, object `input`) or `tool_result` (user only, text-only
//! content, answering an earlier `tool_use`); tools are custom tools with an object schema and
//! unique names; a `tool` choice names one of them.

use std::collections::HashSet;

use serde_json::Value;

use super::error::AnthropicError;
use super::request::{
    BlockContent, ContentBlock, Conversation, CountTokensRequest, InputMessage, MessageRole,
    MessagesRequest, ToolChoiceKind, ToolDefinition,
};
use crate::sampling::{MAX_STOP_BYTES, MAX_STOP_SEQUENCES};

impl MessagesRequest {
    /// Checks the request; the error message starts with the path of the field at fault.
    pub fn validate(&self) -> Result<(), AnthropicError> {
        match self.max_tokens {
            None => {
                return Err(AnthropicError::invalid_param(
                    "max_tokens",
                    "field required",
                ))
            }
            Some(0) => {
                return Err(AnthropicError::invalid_param(
                    "max_tokens",
                    "must be at least 1, got 0",
                ))
            }
            Some(_) => {}
        }
        self.conversation().validate()?;
        check_range("temperature", self.temperature, 0.0, 1.0)?;
        if let Some(p) = self.top_p {
            if !(p.is_finite() && p > 0.0 && p <= 1.0) {
                return Err(AnthropicError::invalid_param(
                    "top_p",
                    format!("must be greater than 0 and at most 1, got {p}"),
                ));
            }
        }
        if let Some(k) = self.top_k.filter(|k| *k < 0) {
            return Err(AnthropicError::invalid_param(
                "top_k",
                format!("must be at least 0, got {k}"),
            ));
        }
        check_stop_sequences(self.stop_sequences.as_deref().unwrap_or_default())
    }
}

impl CountTokensRequest {
    /// Checks the request; the error message starts with the path of the field at fault.
    pub fn validate(&self) -> Result<(), AnthropicError> {
        self.conversation().validate()
    }
}

impl Conversation<'_> {
    pub(super) fn validate(&self) -> Result<(), AnthropicError> {
        if self.model.is_empty() {
            return Err(AnthropicError::invalid_param("model", "must not be empty"));
        }
        let Some(first) = self.messages.first() else {
            return Err(AnthropicError::invalid_param(
                "messages",
                "must contain at least one message",
            ));
        };
        if first.role != MessageRole::User {
            return Err(AnthropicError::invalid_param(
                "messages.0.role",
                format!(
                    "the first message must be \"user\", got {:?}",
                    first.role.as_str()
                ),
            ));
        }
        if let Some(system) = self.system {
            check_text_only(system, "system", "system")?;
        }
        check_tools(self.tools)?;
        self.check_tool_choice()?;
        let mut tool_use_ids = HashSet::new();
        for (i, message) in self.messages.iter().enumerate() {
            check_message(message, i, &mut tool_use_ids)?;
        }
        Ok(())
    }

    fn check_tool_choice(&self) -> Result<(), AnthropicError> {
        let Some(choice) = self.tool_choice else {
            return Ok(());
        };
        match choice.kind {
            ToolChoiceKind::Any if self.tools.is_empty() => Err(AnthropicError::invalid_param(
                "tool_choice.type",
                "\"any\" needs at least one tool in tools",
            )),
            ToolChoiceKind::Tool => match &choice.name {
                None => Err(AnthropicError::invalid_param(
                    "tool_choice.name",
                    "field required when type is \"tool\"",
                )),
                Some(name) if !self.tools.iter().any(|t| &t.name == name) => {
                    Err(AnthropicError::invalid_param(
                        "tool_choice.name",
                        format!("names tool {name:?}, which is not in tools"),
                    ))
                }
                Some(_) => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

/// Checks one message's blocks; records the ids of its `tool_use` blocks in `tool_use_ids`.
fn check_message<'a>(
    message: &'a InputMessage,
    index: usize,
    tool_use_ids: &mut HashSet<&'a str>,
) -> Result<(), AnthropicError> {
    let BlockContent::Blocks(blocks) = &message.content else {
        return Ok(());
    };
    if blocks.is_empty() {
        return Err(AnthropicError::invalid_param(
            format!("messages.{index}.content"),
            "must not be empty",
        ));
    }
    for (j, block) in blocks.iter().enumerate() {
        let path = format!("messages.{index}.content.{j}");
        match (block, message.role) {
            (ContentBlock::Text(_), _) => {}
            (ContentBlock::ToolUse(call), MessageRole::Assistant) => {
                check_tool_use_fields(&call.id, &call.name, &call.input, &path)?;
                tool_use_ids.insert(&call.id);
            }
            (ContentBlock::ToolResult(result), MessageRole::User) => {
                if !tool_use_ids.contains(result.tool_use_id.as_str()) {
                    return Err(AnthropicError::invalid_param(
                        format!("{path}.tool_use_id"),
                        format!("no earlier tool_use block has id {:?}", result.tool_use_id),
                    ));
                }
                if let Some(content) = &result.content {
                    check_text_only(content, &format!("{path}.content"), "tool_result content")?;
                }
            }
            (ContentBlock::ToolUse(_) | ContentBlock::ToolResult(_), role) => {
                return Err(AnthropicError::invalid_param(
                    path,
                    format!(
                        "`{}` blocks are not allowed in {:?} messages",
                        block.kind(),
                        role.as_str()
                    ),
                ))
            }
            (ContentBlock::Unsupported(_), _) => {
                return Err(AnthropicError::invalid_param(
                    path,
                    format!(
                        "`{}` content blocks are not supported; use text, tool_use or tool_result",
                        block.kind()
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn check_tool_use_fields(
    id: &str,
    name: &str,
    input: &Value,
    path: &str,
) -> Result<(), AnthropicError> {
    if id.is_empty() {
        return Err(AnthropicError::invalid_param(
            format!("{path}.id"),
            "must not be empty",
        ));
    }
    if name.is_empty() {
        return Err(AnthropicError::invalid_param(
            format!("{path}.name"),
            "must not be empty",
        ));
    }
    if !input.is_object() {
        return Err(AnthropicError::invalid_param(
            format!("{path}.input"),
            format!("must be a JSON object, got {input}"),
        ));
    }
    Ok(())
}

/// `content` (at `path`, described as `what`) must hold only text blocks.
fn check_text_only(content: &BlockContent, path: &str, what: &str) -> Result<(), AnthropicError> {
    let BlockContent::Blocks(blocks) = content else {
        return Ok(());
    };
    match blocks
        .iter()
        .enumerate()
        .find(|(_, b)| !matches!(b, ContentBlock::Text(_)))
    {
        Some((j, block)) => Err(AnthropicError::invalid_param(
            format!("{path}.{j}"),
            format!(
                "only text blocks are supported in {what}, got `{}`",
                block.kind()
            ),
        )),
        None => Ok(()),
    }
}

fn check_tools(tools: &[ToolDefinition]) -> Result<(), AnthropicError> {
    for (i, tool) in tools.iter().enumerate() {
        let path = format!("tools.{i}");
        if let Some(kind) = tool.kind.as_deref().filter(|k| *k != "custom") {
            return Err(AnthropicError::invalid_param(
                format!("{path}.type"),
                format!("`{kind}` tools are not supported; only custom tools with an input_schema"),
            ));
        }
        if !is_valid_tool_name(&tool.name) {
            return Err(AnthropicError::invalid_param(
                format!("{path}.name"),
                format!(
                    "must be 1 to 64 letters, digits, underscores or dashes, got {:?}",
                    tool.name
                ),
            ));
        }
        if tools[..i].iter().any(|t| t.name == tool.name) {
            return Err(AnthropicError::invalid_param(
                format!("{path}.name"),
                format!("tool {:?} is defined twice", tool.name),
            ));
        }
        match &tool.input_schema {
            Some(schema) if schema.is_object() => {}
            Some(schema) => {
                return Err(AnthropicError::invalid_param(
                    format!("{path}.input_schema"),
                    format!("must be a JSON Schema object, got {schema}"),
                ))
            }
            None => {
                return Err(AnthropicError::invalid_param(
                    format!("{path}.input_schema"),
                    "field required",
                ))
            }
        }
    }
    Ok(())
}

fn is_valid_tool_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_stop_sequences(sequences: &[String]) -> Result<(), AnthropicError> {
    if sequences.len() > MAX_STOP_SEQUENCES {
        return Err(AnthropicError::invalid_param(
            "stop_sequences",
            format!(
                "must have at most {MAX_STOP_SEQUENCES} sequences, got {}",
                sequences.len()
            ),
        ));
    }
    if let Some(i) = sequences.iter().position(String::is_empty) {
        return Err(AnthropicError::invalid_param(
            format!("stop_sequences.{i}"),
            "must not be empty",
        ));
    }
    if let Some(i) = sequences.iter().position(|s| s.len() > MAX_STOP_BYTES) {
        return Err(AnthropicError::invalid_param(
            format!("stop_sequences.{i}"),
            format!("must be at most {MAX_STOP_BYTES} bytes long"),
        ));
    }
    Ok(())
}

/// `value` must be finite and in `[lo, hi]`.
fn check_range(param: &str, value: Option<f64>, lo: f64, hi: f64) -> Result<(), AnthropicError> {
    match value {
        Some(v) if !(v.is_finite() && (lo..=hi).contains(&v)) => Err(
            AnthropicError::invalid_param(param, format!("must be between {lo} and {hi}, got {v}")),
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anthropic::AnthropicErrorKind;
    use serde_json::json;

    fn valid() -> Value {
        json!({
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 64,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                     "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
                ]}
            ],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]
        })
    }

    type Mutation = Box<dyn FnOnce(&mut Value)>;

    fn error_for(mutate: impl FnOnce(&mut Value)) -> AnthropicError {
        let mut v = valid();
        mutate(&mut v);
        let req: MessagesRequest = serde_json::from_value(v).expect("parses");
        let err = req.validate().expect_err("should be rejected");
        assert_eq!(err.kind, AnthropicErrorKind::InvalidRequest);
        assert_eq!(err.status, 400);
        err
    }

    #[test]
    fn a_valid_request_passes() {
        let req: MessagesRequest = serde_json::from_value(valid()).expect("parses");
        assert_eq!(req.validate(), Ok(()));
    }

    #[test]
    fn every_error_names_its_field() {
        let image = json!({"type": "image", "source": {"type": "url", "url": "https://x/y.png"}});
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "max_tokens: field required",
                Box::new(|v| v["max_tokens"] = Value::Null),
            ),
            (
                "max_tokens: must be at least 1",
                Box::new(|v| v["max_tokens"] = json!(0)),
            ),
            ("model: ", Box::new(|v| v["model"] = json!(""))),
            (
                "messages: must contain",
                Box::new(|v| v["messages"] = json!([])),
            ),
            (
                "messages.0.role: the first message must be \"user\"",
                Box::new(|v| v["messages"][0]["role"] = json!("assistant")),
            ),
            (
                "temperature: must be between 0 and 1",
                Box::new(|v| v["temperature"] = json!(1.5)),
            ),
            ("top_p: ", Box::new(|v| v["top_p"] = json!(0.0))),
            ("top_k: ", Box::new(|v| v["top_k"] = json!(-1))),
            (
                "stop_sequences.1: ",
                Box::new(|v| v["stop_sequences"] = json!(["a", ""])),
            ),
            (
                "stop_sequences: must have at most 16",
                Box::new(|v| v["stop_sequences"] = json!(vec!["x"; 17])),
            ),
            (
                "stop_sequences.1: must be at most 512 bytes long",
                Box::new(|v| v["stop_sequences"] = json!(["x", "y".repeat(513)])),
            ),
            (
                "messages.0.content.0: `image` content blocks are not supported",
                Box::new(move |v| v["messages"][0]["content"] = json!([image])),
            ),
            (
                "messages.0.content: must not be empty",
                Box::new(|v| v["messages"][0]["content"] = json!([])),
            ),
            (
                "messages.2.content.0.tool_use_id: no earlier tool_use block has id \"toolu_9\"",
                Box::new(|v| v["messages"][2]["content"][0]["tool_use_id"] = json!("toolu_9")),
            ),
            (
                "messages.2.content.0.content.0: only text blocks are supported in tool_result",
                Box::new(|v| {
                    v["messages"][2]["content"][0]["content"] =
                        json!([{"type": "image", "source": {}}])
                }),
            ),
            (
                "messages.1.content.0.input: must be a JSON object",
                Box::new(|v| v["messages"][1]["content"][0]["input"] = json!("Paris")),
            ),
            (
                "messages.1.content.0: `tool_result` blocks are not allowed in \"assistant\"",
                Box::new(|v| {
                    v["messages"][1]["content"] =
                        json!([{"type": "tool_result", "tool_use_id": "toolu_1"}])
                }),
            ),
            (
                "messages.0.content.0: `tool_use` blocks are not allowed in \"user\"",
                Box::new(|v| {
                    v["messages"][0]["content"] =
                        json!([{"type": "tool_use", "id": "t", "name": "f", "input": {}}])
                }),
            ),
            (
                "messages.1.content.0: `thinking` content blocks are not supported",
                Box::new(|v| {
                    v["messages"][1]["content"] =
                        json!([{"type": "thinking", "thinking": "hmm", "signature": "s"}])
                }),
            ),
            (
                "system.0: only text blocks are supported in system",
                Box::new(|v| v["system"] = json!([{"type": "document", "source": {}}])),
            ),
            (
                "tools.0.name: must be 1 to 64",
                Box::new(|v| v["tools"][0]["name"] = json!("get weather")),
            ),
            (
                "tools.0.input_schema: field required",
                Box::new(|v| v["tools"][0]["input_schema"] = Value::Null),
            ),
            (
                "tools.0.input_schema: must be a JSON Schema object",
                Box::new(|v| v["tools"][0]["input_schema"] = json!([])),
            ),
            (
                "tools.0.type: `web_search_20250305` tools are not supported",
                Box::new(|v| {
                    v["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}])
                }),
            ),
            (
                "tools.1.name: tool \"get_weather\" is defined twice",
                Box::new(|v| {
                    let tool = v["tools"][0].clone();
                    v["tools"] = json!([tool.clone(), tool]);
                }),
            ),
            (
                "tool_choice.name: names tool \"nope\", which is not in tools",
                Box::new(|v| v["tool_choice"] = json!({"type": "tool", "name": "nope"})),
            ),
            (
                "tool_choice.name: field required",
                Box::new(|v| v["tool_choice"] = json!({"type": "tool"})),
            ),
            (
                "tool_choice.type: \"any\" needs at least one tool",
                Box::new(|v| {
                    v["tools"] = json!([]);
                    v["tool_choice"] = json!({"type": "any"});
                }),
            ),
        ];
        for (expected, mutate) in cases {
            let err = error_for(mutate);
            assert!(
                err.message.starts_with(expected),
                "expected {expected:?}, got {:?}",
                err.message
            );
        }
    }

    #[test]
    fn count_tokens_skips_generation_checks() {
        let req: CountTokensRequest = serde_json::from_value(valid()).expect("parses");
        assert_eq!(req.validate(), Ok(()));
        let req: CountTokensRequest = serde_json::from_value(json!({
            "model": "m", "messages": [{"role": "assistant", "content": "hi"}]
        }))
        .expect("parses");
        let err = req.validate().expect_err("first message not user");
        assert!(
            err.message.starts_with("messages.0.role: "),
            "{}",
            err.message
        );
    }

    #[test]
    fn custom_tool_type_and_absent_tool_result_content_are_fine() {
        let mut v = valid();
        v["tools"][0]["type"] = json!("custom");
        v["messages"][2]["content"][0] = json!({"type": "tool_result", "tool_use_id": "toolu_1"});
        v["temperature"] = json!(1.0);
        v["top_k"] = json!(0);
        let req: MessagesRequest = serde_json::from_value(v).expect("parses");
        assert_eq!(req.validate(), Ok(()));
    }
}
