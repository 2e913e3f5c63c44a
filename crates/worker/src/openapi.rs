//! `GET /openapi.json`: the OpenAPI 3.1 document of every public endpoint.
//!
//! The document is hand-written JSON (`crates/worker/openapi.json`) compiled into the binary;
//! only `info.version` is set when it is first served, to this crate's version. The tests below
//! keep it true: its operations are exactly the router's [`routes`](crate::routes), every `$ref`
//! (and every schema a description points to) resolves, every operation is described and can
//! succeed, each request example is accepted by the request type it documents, and the schemas
//! name exactly the fields the wire types serialize.

use std::sync::LazyLock;

use axum::body::Bytes;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use lastmile_protocol::ApiError;
use serde_json::Value;

use crate::error::api_response;

/// The document as written.
const SOURCE: &str = include_str!("../openapi.json");

/// The document as served: [`SOURCE`] with `info.version` set to this crate's version.
fn document() -> Result<Value, serde_json::Error> {
    let mut doc: Value = serde_json::from_str(SOURCE)?;
    if let Some(info) = doc.get_mut("info").and_then(Value::as_object_mut) {
        info.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    }
    Ok(doc)
}

/// The served bytes, rendered once. The tests guarantee the source parses; should it not, every
/// request gets a 500 naming the problem rather than the server refusing to start.
static RENDERED: LazyLock<Result<Bytes, String>> = LazyLock::new(|| {
    document()
        .and_then(|doc| serde_json::to_vec(&doc))
        .map(Bytes::from)
        .map_err(|e| e.to_string())
});

/// `GET /openapi.json`.
pub(crate) async fn openapi_json() -> Response {
    match &*RENDERED {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response(),
        Err(e) => api_response(&ApiError::internal(format!(
            "the OpenAPI document is broken: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use lastmile_engine::tokenizer::SpecialFacts;
    use lastmile_models::DEFAULT_MODEL_ID;
    use lastmile_protocol::anthropic::{
        BlockContent, ContentBlock, CountTokensRequest, CountTokensResponse, InputMessage,
        MessageRole, MessagesRequest, MessagesResponse, MessagesUsage, StopReason, TextBlock,
        ToolChoiceKind, ToolChoiceParam, ToolDefinition, ToolResultBlock, ToolUseBlock,
    };
    use lastmile_protocol::{
        parse_json, AssistantMessage, ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
        ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatTokenLogprob, ChunkChoice,
        CompletionChoice, CompletionChunk, CompletionChunkChoice, CompletionLogprobs,
        CompletionRequest, CompletionResponse, Delta, FinishReason, FunctionCall,
        FunctionDefinition, GenerationParams, KvEvent, MessageContent, ModelCard, ModelList,
        PromptInput, Role, SpeculativeMethod, SpeculativeParams, StopSequences, StreamOptions,
        Tool, ToolCall, ToolCallDelta, TopLogprob, Usage, UsageField,
    };
    use serde::Serialize;
    use serde_json::{json, Map};

    use super::*;

    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn doc() -> Value {
        document().expect("openapi.json parses")
    }

    /// Every operation as (method, path, operation object).
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let paths = doc["paths"].as_object().expect("paths is an object");
        let mut out = Vec::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item is an object") {
                if METHODS.contains(&method.as_str()) {
                    out.push((method.clone(), path.clone(), op.clone()));
                }
            }
        }
        out
    }

    /// Follows a local `$ref`.
    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => doc
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("unresolved {r}")),
            None => v,
        }
    }

    /// Every `$ref` in `v`, and every `#/components/...` pointer named in a string.
    fn references(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, item) in map {
                    match (k.as_str(), item) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => references(item, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| references(item, out)),
            Value::String(s) => {
                for (at, _) in s.match_indices("#/components/") {
                    let tail = &s[at..];
                    let end = tail
                        .find(|c: char| !(c.is_ascii_alphanumeric() || "#/_-".contains(c)))
                        .unwrap_or(tail.len());
                    out.push(tail[..end].to_string());
                }
            }
            _ => {}
        }
    }

    #[test]
    fn document_is_openapi_3_1_named_after_the_crate() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["title"], "lastmile");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(doc["servers"], json!([{"url": "/"}]));
    }

    #[test]
    fn operations_are_exactly_the_routers() {
        let documented: BTreeSet<(String, String)> = operations(&doc())
            .into_iter()
            .map(|(method, path, _)| (method, path))
            .collect();
        let routed: BTreeSet<(String, String)> = crate::routes()
            .iter()
            .map(|r| (r.method.as_str().to_lowercase(), r.path.to_string()))
            .collect();
        assert_eq!(documented, routed);
        assert_eq!(
            crate::routes().len(),
            routed.len(),
            "a route is listed twice"
        );
    }

    #[test]
    fn every_ref_resolves_and_every_component_is_used() {
        let doc = doc();
        let mut refs = Vec::new();
        references(&doc, &mut refs);
        assert!(refs.len() > 50, "too few references found: {refs:?}");
        for r in &refs {
            assert!(r.starts_with("#/components/"), "non-local reference {r}");
            assert!(
                doc.pointer(r.trim_start_matches('#')).is_some(),
                "{r} does not resolve"
            );
        }
        for (kind, items) in doc["components"].as_object().expect("components") {
            for name in items.as_object().expect("component map").keys() {
                let pointer = format!("#/components/{kind}/{name}");
                assert!(refs.contains(&pointer), "{pointer} is never used");
            }
        }
    }

    #[test]
    fn every_operation_is_described_and_can_succeed() {
        let doc = doc();
        let mut ids = BTreeSet::new();
        for (method, path, op) in operations(&doc) {
            let at = format!("{method} {path}");
            for field in ["summary", "description", "operationId"] {
                let text = op[field].as_str().unwrap_or_default();
                assert!(!text.trim().is_empty(), "{at} has no {field}");
            }
            assert!(
                ids.insert(op["operationId"].to_string()),
                "{at}: duplicate operationId"
            );
            let responses = op["responses"].as_object().expect("responses");
            assert!(
                responses.keys().any(|status| status.starts_with('2')),
                "{at} has no 2xx response"
            );
            for (status, response) in responses {
                let response = resolve(&doc, response);
                assert!(
                    response["description"].is_string(),
                    "{at} {status} has no description"
                );
                if status == "503" {
                    assert!(
                        response["headers"]["Retry-After"].is_object(),
                        "{at} 503 does not document Retry-After"
                    );
                }
            }
            if method == "post" {
                let body = &op["requestBody"]["content"]["application/json"];
                assert!(body["schema"]["$ref"].is_string(), "{at}: no body schema");
                assert!(body["example"].is_object(), "{at}: no example body");
                for status in ["400", "413"] {
                    assert!(responses.contains_key(status), "{at} lacks {status}");
                }
            }
        }
    }

    #[test]
    fn request_examples_are_accepted() {
        let doc = doc();
        for (method, path, op) in operations(&doc) {
            if method != "post" {
                continue;
            }
            let example = op["requestBody"]["content"]["application/json"]["example"].clone();
            if path == "/internal/prefill" {
                let req: lastmile_protocol::PrefillRequest =
                    accepted(&path, parse_json(example.to_string().as_bytes()));
                assert!(!req.tokens.is_empty());
                continue;
            }
            assert_eq!(example["model"], DEFAULT_MODEL_ID, "{path}");
            let max_tokens = example["max_tokens"].as_u64().unwrap_or(0);
            assert!(max_tokens <= 8, "{path}: keep the example cheap on a CPU");
            let body = example.to_string().into_bytes();
            let p = path.as_str();
            match p {
                "/v1/chat/completions" => {
                    let req: ChatCompletionRequest = accepted(p, parse_json(&body));
                    accepted(p, req.validate());
                }
                "/v1/completions" => {
                    let req: CompletionRequest = accepted(p, parse_json(&body));
                    accepted(p, req.validate());
                }
                "/v1/messages" => {
                    let req: MessagesRequest = accepted(p, parse_json(&body));
                    accepted(p, req.to_chat());
                }
                "/v1/messages/count_tokens" => {
                    let req: CountTokensRequest = accepted(p, parse_json(&body));
                    accepted(p, req.to_chat());
                }
                other => panic!("no request type checks the example of POST {other}"),
            }
        }
    }

    fn accepted<T>(path: &str, result: Result<T, impl std::fmt::Display>) -> T {
        result.unwrap_or_else(|e| panic!("{path}: the example is refused: {e}"))
    }

    fn keys<T: Serialize>(value: &T) -> BTreeSet<String> {
        match serde_json::to_value(value).expect("serializes") {
            Value::Object(map) => map.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    fn properties(schema: &Value) -> BTreeSet<String> {
        schema["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn empty_map() -> Map<String, Value> {
        Map::new()
    }

    /// One value of each wire type with every optional field set, by schema name. The struct
    /// literals are exhaustive on purpose: a new field fails to compile here until it is
    /// documented.
    fn full_values() -> BTreeMap<&'static str, BTreeSet<String>> {
        let usage = Usage::new(1, 2);
        let call = ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "f".into(),
                arguments: "{}".into(),
            },
        };
        let top = TopLogprob {
            token: "a".into(),
            logprob: -0.5,
            bytes: Some(vec![97]),
        };
        let token = ChatTokenLogprob {
            token: "a".into(),
            logprob: -0.5,
            bytes: Some(vec![97]),
            top_logprobs: vec![top.clone()],
        };
        let chat_logprobs = ChatLogprobs {
            content: vec![token.clone()],
            refusal: Some(vec![]),
        };
        let completion_logprobs = CompletionLogprobs {
            tokens: vec!["a".into()],
            token_logprobs: vec![Some(-0.5)],
            top_logprobs: vec![Some(empty_map())],
            text_offset: vec![0],
        };
        let message = ChatMessage {
            role: Role::Assistant,
            content: Some(MessageContent::Text("hi".into())),
            name: Some("bob".into()),
            tool_calls: Some(vec![]),
            tool_call_id: Some("call_1".into()),
        };
        let function = FunctionDefinition {
            name: "f".into(),
            description: Some("d".into()),
            parameters: Some(json!({})),
            strict: Some(true),
        };
        let tool = Tool {
            kind: "function".into(),
            function: function.clone(),
        };
        let speculative = SpeculativeParams {
            method: Some(SpeculativeMethod::DraftModel),
            ngram: 3,
            max_draft: 8,
        };
        let params = GenerationParams {
            model: "m".into(),
            max_tokens: Some(1),
            temperature: Some(1.0),
            top_p: Some(1.0),
            top_k: Some(1),
            min_p: Some(0.0),
            n: Some(1),
            stream: true,
            stream_options: Some(StreamOptions::default()),
            stop: Some(StopSequences::One("x".into())),
            seed: Some(1),
            presence_penalty: Some(0.0),
            frequency_penalty: Some(0.0),
            repetition_penalty: Some(1.0),
            ignore_eos: Some(false),
            logit_bias: Some(empty_map()),
            user: Some("u".into()),
            response_format: Some(json!({"type": "text"})),
            guided_json: Some(json!({})),
            guided_regex: Some("a".into()),
            guided_choice: Some(vec!["a".into()]),
            guided_grammar: Some("start: \"a\"".into()),
            speculative: Some(speculative),
        };
        let chat = ChatCompletionRequest {
            params: params.clone(),
            messages: vec![message.clone()],
            max_completion_tokens: Some(1),
            logprobs: Some(true),
            top_logprobs: Some(1),
            tools: Some(vec![]),
            tool_choice: Some(json!("auto")),
            parallel_tool_calls: Some(true),
        };
        let completion = CompletionRequest {
            params,
            prompt: PromptInput::Text("p".into()),
            echo: Some(false),
            logprobs: Some(1),
            suffix: Some(String::new()),
            best_of: Some(1),
        };
        let delta = Delta {
            role: Some(Role::Assistant),
            content: Some("a".into()),
            tool_calls: Some(vec![]),
        };
        let chunk_choice = ChunkChoice {
            index: 0,
            delta: delta.clone(),
            logprobs: None,
            finish_reason: None,
        };
        let completion_chunk_choice = CompletionChunkChoice {
            text: "a".into(),
            index: 0,
            logprobs: None,
            finish_reason: None,
        };
        let tool_call_delta = ToolCallDelta::start(0, "call_1", "f");
        let input_message = InputMessage {
            role: MessageRole::User,
            content: BlockContent::Text("hi".into()),
        };
        let anthropic_tool = ToolDefinition {
            kind: Some("custom".into()),
            name: "f".into(),
            description: Some("d".into()),
            input_schema: Some(json!({})),
        };
        let tool_choice = ToolChoiceParam {
            kind: ToolChoiceKind::Tool,
            name: Some("f".into()),
            disable_parallel_tool_use: Some(true),
        };
        let messages = MessagesRequest {
            model: "m".into(),
            max_tokens: Some(1),
            messages: vec![input_message.clone()],
            system: Some(BlockContent::Text("s".into())),
            stop_sequences: Some(vec![]),
            temperature: Some(0.5),
            top_p: Some(1.0),
            top_k: Some(1),
            stream: true,
            tools: Some(vec![]),
            tool_choice: Some(tool_choice.clone()),
            metadata: Some(json!({})),
            output_config: Some(json!({})),
        };
        let count = CountTokensRequest {
            model: "m".into(),
            messages: vec![input_message.clone()],
            system: Some(BlockContent::Text("s".into())),
            tools: Some(vec![]),
            tool_choice: Some(tool_choice.clone()),
        };
        let message_response = MessagesResponse {
            id: "msg_1".into(),
            kind: "message".into(),
            role: MessageRole::Assistant,
            model: "m".into(),
            content: vec![],
            stop_reason: Some(StopReason::EndTurn),
            stop_sequence: None,
            usage: MessagesUsage {
                input_tokens: 1,
                output_tokens: 2,
            },
        };
        let mut out = BTreeMap::new();
        out.insert("ChatCompletionRequest", keys(&chat));
        out.insert("ChatMessage", keys(&message));
        out.insert("Tool", keys(&tool));
        out.insert("FunctionDefinition", keys(&function));
        out.insert("ToolCall", keys(&call));
        out.insert("StreamOptions", keys(&StreamOptions::default()));
        out.insert("SpeculativeParams", keys(&speculative));
        out.insert("CompletionRequest", keys(&completion));
        out.insert(
            "ChatCompletionResponse",
            keys(&ChatCompletionResponse {
                id: "chatcmpl-1".into(),
                object: "chat.completion".into(),
                created: 1,
                model: "m".into(),
                choices: vec![],
                usage,
                system_fingerprint: Some("fp".into()),
            }),
        );
        out.insert(
            "ChatChoice",
            keys(&ChatChoice {
                index: 0,
                message: AssistantMessage::new("a"),
                logprobs: Some(chat_logprobs.clone()),
                finish_reason: FinishReason::Stop,
            }),
        );
        out.insert(
            "AssistantMessage",
            keys(&AssistantMessage {
                role: Role::Assistant,
                content: None,
                tool_calls: Some(vec![call.clone()]),
            }),
        );
        out.insert("ChatLogprobs", keys(&chat_logprobs));
        out.insert("ChatTokenLogprob", keys(&token));
        let special = SpecialFacts {
            bos_id: Some(1),
            bos_text: Some("<s>".into()),
            eos_text: Some("</s>".into()),
            add_bos: true,
            eog_ids: vec![2],
        };
        out.insert("SpecialFacts", keys(&special));
        out.insert(
            "PromptCard",
            keys(&crate::PromptCard {
                fingerprint: "00".into(),
                block_size: 16,
                tokenizer: "{}".into(),
                special,
                chat_template: String::new(),
            }),
        );
        out.insert("TopLogprob", keys(&top));
        out.insert("Usage", keys(&usage));
        out.insert(
            "ChatCompletionChunk",
            keys(&ChatCompletionChunk {
                id: "chatcmpl-1".into(),
                object: "chat.completion.chunk".into(),
                created: 1,
                model: "m".into(),
                system_fingerprint: Some("fp".into()),
                choices: vec![chunk_choice.clone()],
                usage: UsageField::Reported(usage),
            }),
        );
        out.insert("ChatChunkChoice", keys(&chunk_choice));
        out.insert("ChatDelta", keys(&delta));
        out.insert("ToolCallDelta", keys(&tool_call_delta));
        out.insert(
            "CompletionResponse",
            keys(&CompletionResponse {
                id: "cmpl-1".into(),
                object: "text_completion".into(),
                created: 1,
                model: "m".into(),
                choices: vec![],
                usage,
                system_fingerprint: Some("fp".into()),
            }),
        );
        out.insert(
            "CompletionChoice",
            keys(&CompletionChoice {
                text: "a".into(),
                index: 0,
                logprobs: Some(completion_logprobs.clone()),
                finish_reason: FinishReason::Length,
            }),
        );
        out.insert("CompletionLogprobs", keys(&completion_logprobs));
        out.insert(
            "CompletionChunk",
            keys(&CompletionChunk {
                id: "cmpl-1".into(),
                object: "text_completion".into(),
                created: 1,
                model: "m".into(),
                system_fingerprint: Some("fp".into()),
                choices: vec![completion_chunk_choice.clone()],
                usage: UsageField::Reported(usage),
            }),
        );
        out.insert("CompletionChunkChoice", keys(&completion_chunk_choice));
        out.insert(
            "ModelCard",
            keys(&ModelCard {
                id: "m".into(),
                object: "model".into(),
                created: 1,
                owned_by: "lastmile".into(),
                max_model_len: Some(8),
            }),
        );
        out.insert("ModelList", keys(&ModelList::new(vec![])));
        out.insert("MessagesRequest", keys(&messages));
        out.insert("CountTokensRequest", keys(&count));
        out.insert("AnthropicInputMessage", keys(&input_message));
        out.insert("AnthropicToolDefinition", keys(&anthropic_tool));
        out.insert("AnthropicToolChoice", keys(&tool_choice));
        out.insert(
            "AnthropicTextBlock",
            keys(&ContentBlock::Text(TextBlock { text: "a".into() })),
        );
        out.insert(
            "AnthropicToolUseBlock",
            keys(&ContentBlock::ToolUse(ToolUseBlock {
                id: "toolu_1".into(),
                name: "f".into(),
                input: json!({}),
            })),
        );
        out.insert(
            "AnthropicToolResultBlock",
            keys(&ContentBlock::ToolResult(ToolResultBlock {
                tool_use_id: "toolu_1".into(),
                content: Some(BlockContent::Text("r".into())),
                is_error: Some(false),
            })),
        );
        out.insert("MessagesResponse", keys(&message_response));
        out.insert("MessagesUsage", keys(&message_response.usage));
        out.insert(
            "CountTokensResponse",
            keys(&CountTokensResponse { input_tokens: 1 }),
        );
        out.insert(
            "PrefillRequest",
            keys(&lastmile_protocol::PrefillRequest { tokens: vec![1] }),
        );
        out.insert(
            "PrefillReply",
            keys(&lastmile_protocol::PrefillReply {
                lease: "a".into(),
                blocks: 1,
                block_size: 16,
                expires_in_ms: 1,
            }),
        );
        out
    }

    #[test]
    fn schemas_name_exactly_the_fields_of_the_wire_types() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        for (name, fields) in full_values() {
            assert_eq!(properties(&schemas[name]), fields, "schema {name}");
        }
        let kv = &schemas["KvEvent"]["oneOf"];
        let stored = KvEvent::Stored {
            hash: 1,
            parent: Some(0),
        };
        assert_eq!(properties(&kv[0]), keys(&stored));
        assert_eq!(properties(&kv[1]), keys(&KvEvent::Removed { hash: 1 }));
    }

    #[tokio::test]
    async fn served_as_json_with_the_crate_version() {
        let resp = openapi_json().await;
        assert_eq!(resp.status(), axum::http::StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let served: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(served, doc());
    }
}
