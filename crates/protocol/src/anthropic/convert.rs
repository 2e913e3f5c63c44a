//! Conversion of a validated Anthropic request into our OpenAI [`ChatCompletionRequest`], so
//! `/v1/messages` runs through the same pipeline as `/v1/chat/completions`.
//!
//! Message order is kept exactly: `system` becomes a leading system message; an assistant turn
//! becomes one assistant message (text plus `tool_calls`); a user turn becomes, block by block,
//! `tool` messages for `tool_result` blocks and user messages for runs of text between them.

use serde_json::{json, Map, Value};

use super::error::AnthropicError;
use super::request::{
    BlockContent, ContentBlock, Conversation, CountTokensRequest, MessageRole, MessagesRequest,
    ToolChoiceKind, ToolChoiceParam, ToolDefinition, ToolResultBlock,
};
use crate::chat::{ChatCompletionRequest, ChatMessage, MessageContent, Role, ToolChoice};
use crate::sampling::{StopSequences, StreamOptions};

impl MessagesRequest {
    /// Validates the request and converts it to the equivalent chat request.
    ///
    /// A streamed request also asks for usage (`stream_options.include_usage`), which the
    /// `message_delta` event reports. The result still goes through the chat pipeline's own
    /// `validate()`.
    pub fn to_chat(&self) -> Result<ChatCompletionRequest, AnthropicError> {
        self.validate()?;
        let mut chat = self.conversation().to_chat();
        chat.params.max_tokens = self.max_tokens;
        chat.params.temperature = self.temperature;
        chat.params.top_p = self.top_p;
        chat.params.top_k = self.top_k;
        chat.params.stop = self
            .stop_sequences
            .clone()
            .filter(|s| !s.is_empty())
            .map(StopSequences::Many);
        chat.params.stream = self.stream;
        if self.stream {
            chat.params.stream_options = Some(StreamOptions {
                include_usage: true,
            });
        }
        chat.params.response_format = self.response_format()?;
        Ok(chat)
    }

    /// `output_config.format` as the chat API's `response_format`.
    fn response_format(&self) -> Result<Option<Value>, AnthropicError> {
        let format = match &self.output_config {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(config)) => config.get("format"),
            Some(other) => {
                return Err(AnthropicError::invalid_param(
                    "output_config",
                    format!("must be an object, got {other}"),
                ))
            }
        };
        let Some(format) = format.filter(|f| !f.is_null()) else {
            return Ok(None);
        };
        let forced = self
            .tool_choice
            .as_ref()
            .is_some_and(|c| matches!(c.kind, ToolChoiceKind::Any | ToolChoiceKind::Tool));
        if forced {
            return Err(AnthropicError::invalid_param(
                "output_config.format",
                "cannot be combined with tool_choice `any` or `tool`",
            ));
        }
        match (
            format.get("type").and_then(Value::as_str),
            format.get("schema"),
        ) {
            (Some("json_schema"), Some(schema @ Value::Object(_))) => Ok(Some(json!({
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema, "strict": true}
            }))),
            _ => Err(AnthropicError::invalid_param(
                "output_config.format",
                "must be {\"type\": \"json_schema\", \"schema\": {...}}",
            )),
        }
    }
}

impl CountTokensRequest {
    /// Validates the request and converts it to the chat request whose prompt is counted.
    pub fn to_chat(&self) -> Result<ChatCompletionRequest, AnthropicError> {
        self.validate()?;
        Ok(self.conversation().to_chat())
    }
}

impl Conversation<'_> {
    /// The chat request carrying this conversation, tools and tool choice (call after
    /// validation).
    fn to_chat(self) -> ChatCompletionRequest {
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        let system = self.system.map(BlockContent::text).unwrap_or_default();
        if !system.is_empty() {
            messages.push(ChatMessage::new(Role::System, system));
        }
        for message in self.messages {
            match message.role {
                MessageRole::User => push_user_turn(&mut messages, &message.content),
                MessageRole::Assistant => messages.push(assistant_message(&message.content)),
            }
        }
        let mut chat = ChatCompletionRequest::new(self.model, messages);
        if !self.tools.is_empty() {
            chat.tools = Some(self.tools.iter().map(tool_value).collect());
        }
        if let Some(choice) = self.tool_choice {
            chat.tool_choice = Some(chat_tool_choice(choice).to_value());
            chat.parallel_tool_calls = choice.disable_parallel_tool_use.map(|disable| !disable);
        }
        chat
    }
}

/// Appends a user turn: a user message per run of text blocks, a tool message per result.
fn push_user_turn(out: &mut Vec<ChatMessage>, content: &BlockContent) {
    let blocks = match content {
        BlockContent::Text(text) => return out.push(ChatMessage::new(Role::User, text.clone())),
        BlockContent::Blocks(blocks) => blocks,
    };
    let mut text: Vec<&str> = Vec::new();
    for block in blocks {
        match block {
            ContentBlock::Text(t) => text.push(&t.text),
            ContentBlock::ToolResult(result) => {
                flush_user_text(out, &mut text);
                out.push(tool_message(result));
            }
            // Rejected by validation.
            ContentBlock::ToolUse(_) | ContentBlock::Unsupported(_) => {}
        }
    }
    flush_user_text(out, &mut text);
}

fn flush_user_text(out: &mut Vec<ChatMessage>, text: &mut Vec<&str>) {
    if !text.is_empty() {
        out.push(ChatMessage::new(Role::User, text.join("\n")));
        text.clear();
    }
}

fn tool_message(result: &ToolResultBlock) -> ChatMessage {
    let text = result
        .content
        .as_ref()
        .map(BlockContent::text)
        .unwrap_or_default();
    let text = if result.is_error == Some(true) {
        format!("Error: {text}")
    } else {
        text
    };
    ChatMessage {
        tool_call_id: Some(result.tool_use_id.clone()),
        ..ChatMessage::new(Role::Tool, text)
    }
}

/// One assistant message: the text blocks joined as content (none when there are none), and
/// the `tool_use` blocks as OpenAI `tool_calls`.
fn assistant_message(content: &BlockContent) -> ChatMessage {
    let blocks = match content {
        BlockContent::Text(text) => return ChatMessage::new(Role::Assistant, text.clone()),
        BlockContent::Blocks(blocks) => blocks,
    };
    let mut text: Vec<&str> = Vec::new();
    let mut calls = Vec::new();
    for block in blocks {
        match block {
            ContentBlock::Text(t) => text.push(&t.text),
            ContentBlock::ToolUse(call) => calls.push(json!({
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.input.to_string()},
            })),
            // Rejected by validation.
            ContentBlock::ToolResult(_) | ContentBlock::Unsupported(_) => {}
        }
    }
    ChatMessage {
        role: Role::Assistant,
        content: (!text.is_empty()).then(|| MessageContent::Text(text.join("\n"))),
        name: None,
        tool_calls: (!calls.is_empty()).then_some(calls),
        tool_call_id: None,
    }
}

/// `{"type": "function", "function": {"name", "description", "parameters"}}`.
fn tool_value(tool: &ToolDefinition) -> Value {
    let mut function = Map::new();
    function.insert("name".to_owned(), Value::from(tool.name.clone()));
    if let Some(description) = &tool.description {
        function.insert("description".to_owned(), Value::from(description.clone()));
    }
    let parameters = tool
        .input_schema
        .clone()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    function.insert("parameters".to_owned(), parameters);
    json!({"type": "function", "function": function})
}

fn chat_tool_choice(choice: &ToolChoiceParam) -> ToolChoice {
    match choice.kind {
        ToolChoiceKind::Auto => ToolChoice::Auto,
        ToolChoiceKind::Any => ToolChoice::Required,
        ToolChoiceKind::Tool => ToolChoice::Function(choice.name.clone().unwrap_or_default()),
        ToolChoiceKind::None => ToolChoice::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ToolCall;

    fn parse(v: Value) -> MessagesRequest {
        serde_json::from_value(v).expect("request parses")
    }

    fn tools() -> Value {
        json!([{"name": "get_weather", "description": "Current weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
               {"name": "get_time", "input_schema": {"type": "object"}}])
    }

    /// user → assistant tool_use ×2 → user tool_result ×2 + text → assistant text.
    fn round_trip() -> MessagesRequest {
        parse(json!({
            "model": "claude-sonnet-4-20250514",
            "max_tokens": 300,
            "system": "You are terse.",
            "messages": [
                {"role": "user", "content": "Weather and time in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking both."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                     "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1",
                     "content": [{"type": "text", "text": "18°C"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "timeout",
                     "is_error": true},
                    {"type": "text", "text": "Be quick."}
                ]},
                {"role": "assistant", "content": "It is 18°C; the time is unknown."},
                {"role": "user", "content": [{"type": "text", "text": "Thanks"},
                                             {"type": "text", "text": "bye"}]}
            ],
            "tools": tools(),
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"],
            "temperature": 0.2,
            "top_p": 0.95,
            "top_k": 20,
            "metadata": {"user_id": "u-1"}
        }))
    }

    #[test]
    fn full_tool_round_trip_keeps_order_and_shapes() {
        let chat = round_trip().to_chat().expect("converts");
        let roles: Vec<Role> = chat.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::Tool,
                Role::User,
                Role::Assistant,
                Role::User
            ]
        );
        let m = &chat.messages;
        assert_eq!(m[0].text(), "You are terse.");
        assert_eq!(m[2].text(), "Checking both.");
        assert_eq!(
            m[2].typed_tool_calls(2).expect("valid calls"),
            vec![
                ToolCall::new("toolu_1", "get_weather", r#"{"city":"Paris"}"#),
                ToolCall::new("toolu_2", "get_time", "{}"),
            ]
        );
        assert_eq!(m[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(m[3].text(), "18°C");
        assert_eq!(m[4].tool_call_id.as_deref(), Some("toolu_2"));
        assert_eq!(m[4].text(), "Error: timeout");
        assert_eq!(m[5].text(), "Be quick.");
        assert_eq!(m[7].text(), "Thanks\nbye");
        assert_eq!(chat.validate(), Ok(()));
    }

    #[test]
    fn sampling_tools_and_choice_are_carried_over() {
        let chat = round_trip().to_chat().expect("converts");
        assert_eq!(chat.params.model, "claude-sonnet-4-20250514");
        assert_eq!(chat.params.max_tokens, Some(300));
        assert_eq!(chat.params.temperature, Some(0.2));
        assert_eq!(chat.params.top_p, Some(0.95));
        assert_eq!(chat.params.top_k, Some(20));
        assert_eq!(
            chat.params.stop,
            Some(StopSequences::Many(vec!["END".into()]))
        );
        assert!(!chat.params.stream);
        assert_eq!(chat.params.stream_options, None);
        assert_eq!(chat.tool_choice, Some(json!("auto")));
        assert_eq!(chat.parallel_tool_calls, Some(false));
        assert_eq!(
            chat.tools.as_deref().map(|t| t[0].clone()),
            Some(json!({"type": "function", "function": {
                "name": "get_weather", "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}))
        );
        assert_eq!(
            chat.tools.as_deref().map(|t| t[1].clone()),
            Some(json!({"type": "function", "function": {
                "name": "get_time", "parameters": {"type": "object"}}}))
        );
        let typed = chat.typed_tools().expect("typed");
        assert_eq!(typed.len(), 2);
    }

    #[test]
    fn tool_choice_kinds_map_to_openai() {
        let cases = [
            (json!({"type": "auto"}), json!("auto")),
            (json!({"type": "any"}), json!("required")),
            (json!({"type": "none"}), json!("none")),
            (
                json!({"type": "tool", "name": "get_time"}),
                json!({"type": "function", "function": {"name": "get_time"}}),
            ),
        ];
        for (choice, expected) in cases {
            let chat = parse(json!({
                "model": "m", "max_tokens": 5, "tools": tools(), "tool_choice": choice,
                "messages": [{"role": "user", "content": "hi"}]
            }))
            .to_chat()
            .expect("converts");
            assert_eq!(chat.tool_choice, Some(expected));
            assert_eq!(chat.parallel_tool_calls, None);
            assert_eq!(chat.validate(), Ok(()));
        }
    }

    #[test]
    fn streaming_asks_for_usage_and_minimal_request_stays_minimal() {
        let req = parse(json!({
            "model": "m", "max_tokens": 5, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]
        }));
        let chat = req.to_chat().expect("converts");
        assert!(chat.params.include_usage());
        assert_eq!(chat.messages, vec![ChatMessage::new(Role::User, "hi")]);
        assert_eq!(chat.tools, None);
        assert_eq!(chat.tool_choice, None);
        assert_eq!(chat.params.stop, None);
        assert_eq!(chat.validate(), Ok(()));
    }

    #[test]
    fn assistant_with_only_tool_use_has_no_content() {
        let chat = round_trip().to_chat().expect("converts");
        let req = parse(json!({
            "model": "m", "max_tokens": 5,
            "messages": [
                {"role": "user", "content": "time?"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t1", "name": "get_time", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}
            ]
        }));
        let only_calls = req.to_chat().expect("converts");
        assert_eq!(only_calls.messages[1].content, None);
        assert_eq!(only_calls.messages[2].text(), "");
        assert_eq!(only_calls.validate(), Ok(()));
        assert!(chat.messages[2].content.is_some());
    }

    #[test]
    fn invalid_requests_do_not_convert() {
        let req = parse(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
        let err = req.to_chat().expect_err("max_tokens missing");
        assert!(err.message.starts_with("max_tokens: "), "{}", err.message);
    }

    #[test]
    fn output_format_becomes_a_json_schema_response_format() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let req = parse(json!({"model": "m", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": schema}}}));
        let chat = req.to_chat().expect("converts");
        assert_eq!(
            chat.params.response_format.as_ref().expect("format")["json_schema"]["schema"],
            schema
        );
        assert!(chat.validate().is_ok());
        let bad = parse(json!({"model": "m", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "output_config": {"format": {"type": "xml"}}}));
        let err = bad.to_chat().expect_err("refused");
        assert!(
            err.message.contains("output_config.format"),
            "{}",
            err.message
        );
    }

    #[test]
    fn count_tokens_converts_like_messages() {
        let full = round_trip();
        let count: CountTokensRequest =
            serde_json::from_value(serde_json::to_value(&full).expect("ser")).expect("de");
        let counted = count.to_chat().expect("converts");
        let generated = full.to_chat().expect("converts");
        assert_eq!(counted.messages, generated.messages);
        assert_eq!(counted.tools, generated.tools);
        assert_eq!(counted.tool_choice, generated.tool_choice);
        assert_eq!(counted.params.max_tokens, None);
        assert_eq!(counted.validate(), Ok(()));
    }
}
