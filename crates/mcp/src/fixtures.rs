//! The official MCP conformance suite's fixtures, served with `--mcp-conformance-fixtures` as
//! the official SDKs' conformance servers serve them: the tools, resources, prompts and
//! completions the suite calls by name (`test_simple_text`, `test://static-text`, …), beside the
//! real tools and through the same MCP stack, so the suite measures the stack users get.
//!
//! They are off by default: they do nothing useful, and `test_sampling`/`test_elicitation` ask
//! the client for a model answer or the user's input.
#![allow(deprecated)] // sampling and logging are deprecated from 2026-07-28; the suite tests them

use std::time::Duration;

use base64::Engine as _;
use rmcp::handler::server::router::tool::{ToolRoute, ToolRouter};
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolResponse, CallToolResult, CompleteRequestParams, CompleteResult, GetPromptResult,
    LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam, Prompt,
    ReadResourceResult, Resource, ResourceTemplate, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::{done, LastmileMcp};

/// A fixture's JSON as its protocol type (the literals here are checked by the unit tests).
fn typed<T: DeserializeOwned>(v: Value) -> Result<T, ErrorData> {
    serde_json::from_value(v).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

/// A 1×1 PNG.
const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

/// A 10 ms mono 8 kHz WAV of silence.
fn wav() -> String {
    let samples = 80u32;
    let mut b = Vec::with_capacity(44 + samples as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + samples).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes()); // format chunk size
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // channels
    b.extend_from_slice(&8000u32.to_le_bytes()); // sample rate
    b.extend_from_slice(&8000u32.to_le_bytes()); // bytes per second
    b.extend_from_slice(&1u16.to_le_bytes()); // block align
    b.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
    b.extend_from_slice(b"data");
    b.extend_from_slice(&samples.to_le_bytes());
    b.resize(44 + samples as usize, 128); // 8-bit silence
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn no_args() -> Value {
    json!({"type": "object", "properties": {}})
}

/// The fixture tools' definitions.
fn tool_specs() -> Vec<Value> {
    let simple = |name: &str, description: &str| json!({"name": name, "description": description, "inputSchema": no_args()});
    vec![
        simple("test_simple_text", "Returns one text block."),
        simple("test_image_content", "Returns one PNG image."),
        simple("test_audio_content", "Returns one WAV clip."),
        simple(
            "test_embedded_resource",
            "Returns an embedded text resource.",
        ),
        simple(
            "test_multiple_content_types",
            "Returns text, an image and a resource.",
        ),
        simple(
            "test_tool_with_logging",
            "Logs three messages while it runs.",
        ),
        simple(
            "test_tool_with_progress",
            "Reports progress 0, 50 and 100 of 100.",
        ),
        simple("test_error_handling", "Always fails, as a tool result."),
        simple(
            "test_reconnection",
            "Answers after a pause (SSE resumption checks).",
        ),
        json!({"name": "test_sampling", "description": "Asks the client's model (sampling).",
               "inputSchema": {"type": "object", "properties": {"prompt": {"type": "string"}},
                               "required": ["prompt"]}}),
        json!({"name": "test_elicitation", "description": "Asks the client's user (elicitation).",
               "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}},
                               "required": ["message"]}}),
        simple(
            "test_elicitation_sep1034_defaults",
            "Elicits fields with defaults (SEP-1034).",
        ),
        simple(
            "test_elicitation_sep1330_enums",
            "Elicits every enum variant (SEP-1330).",
        ),
        json!({"name": "json_schema_2020_12_tool",
               "description": "Tool with JSON Schema 2020-12 features",
               "inputSchema": {
                   "$schema": "https://json-schema.org/draft/2020-12/schema",
                   "type": "object",
                   "$defs": {"address": {"$anchor": "addressDef", "type": "object",
                       "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
                   "properties": {"name": {"type": "string"},
                                  "address": {"$ref": "#/$defs/address"},
                                  "contactMethod": {"type": "string", "enum": ["phone", "email"]},
                                  "phone": {"type": "string"}, "email": {"type": "string"}},
                   "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
                   "if": {"properties": {"contactMethod": {"const": "phone"}},
                          "required": ["contactMethod"]},
                   "then": {"required": ["phone"]},
                   "else": {"required": ["email"]},
                   "additionalProperties": false}}),
    ]
}

/// The fixture tools, to add to the real ones.
pub(crate) fn tools() -> ToolRouter<LastmileMcp> {
    let mut router = ToolRouter::new();
    for spec in tool_specs() {
        let tool: Tool = match typed(spec) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("conformance fixture: {}", e.message);
                continue;
            }
        };
        router.add_route(ToolRoute::new_dyn(
            tool,
            |ctx: ToolCallContext<'_, LastmileMcp>| {
                Box::pin(async move { call(ctx).await.map(CallToolResponse::from) })
            },
        ));
    }
    router
}

fn text(t: impl Into<String>) -> Value {
    json!({"type": "text", "text": t.into()})
}

fn result(content: Vec<Value>) -> Result<CallToolResult, ErrorData> {
    done(json!({ "content": content }))
}

async fn call(ctx: ToolCallContext<'_, LastmileMcp>) -> Result<CallToolResult, ErrorData> {
    let rc = &ctx.request_context;
    let arg = |k: &str| {
        ctx.arguments
            .as_ref()
            .and_then(|a| a.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let image = json!({"type": "image", "data": PNG, "mimeType": "image/png"});
    match ctx.name.as_ref() {
        "test_simple_text" => result(vec![text("This is a simple text response for testing.")]),
        "test_image_content" => result(vec![image]),
        "test_audio_content" => result(vec![
            json!({"type": "audio", "data": wav(), "mimeType": "audio/wav"}),
        ]),
        "test_embedded_resource" => result(vec![json!({"type": "resource", "resource": {
            "uri": "test://embedded-resource", "mimeType": "text/plain",
            "text": "This is an embedded resource content."}})]),
        "test_multiple_content_types" => result(vec![
            text("Multiple content types test:"),
            image,
            json!({"type": "resource", "resource": {
                "uri": "test://mixed-content-resource", "mimeType": "application/json",
                "text": "{\"test\":\"data\",\"value\":123}"}}),
        ]),
        "test_tool_with_logging" => with_logging(rc).await,
        "test_tool_with_progress" => with_progress(rc).await,
        "test_error_handling" => done(json!({"isError": true, "content": [
            text("This tool intentionally returns an error for testing")]})),
        "test_reconnection" => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            result(vec![text("Reconnection test completed successfully")])
        }
        "test_sampling" => sampling(rc, arg("prompt")).await,
        "test_elicitation" => {
            let schema = json!({"type": "object", "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"}},
                "required": ["username", "email"]});
            elicit(&ctx, arg("message"), schema, "User response").await
        }
        "test_elicitation_sep1034_defaults" => {
            let schema = sep1034_defaults_schema();
            let m = "Please review and update the form fields with defaults";
            elicit(&ctx, m.into(), schema, "Elicitation completed").await
        }
        "test_elicitation_sep1330_enums" => {
            let schema = sep1330_enums_schema();
            let m = "Please select options from the enum fields";
            elicit(&ctx, m.into(), schema, "Elicitation completed").await
        }
        "json_schema_2020_12_tool" => result(vec![text(format!(
            "JSON Schema 2020-12 tool called with: {}",
            Value::Object(ctx.arguments.clone().unwrap_or_default())
        ))]),
        other => Err(ErrorData::invalid_params(
            format!("unknown tool {other}"),
            None,
        )),
    }
}

/// `test_tool_with_logging`: three info log messages 50 ms apart, then a text.
async fn with_logging(rc: &RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
    for (i, m) in [
        "Tool execution started",
        "Tool processing data",
        "Tool execution completed",
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let note = LoggingMessageNotificationParam::new(LoggingLevel::Info, json!(m))
            .with_logger("conformance");
        let _ = rc.peer.notify_logging_message(note).await;
    }
    result(vec![text("Tool with logging executed successfully")])
}

/// `test_tool_with_progress`: progress 0, 50 and 100 of 100, 50 ms apart (when the request
/// has a progress token), then a text.
async fn with_progress(rc: &RequestContext<RoleServer>) -> Result<CallToolResult, ErrorData> {
    let token = rc.meta.get_progress_token();
    for (i, p) in [0.0, 50.0, 100.0].into_iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(t) = &token {
            let note = ProgressNotificationParam::new(t.clone(), p).with_total(100.0);
            let _ = rc.peer.notify_progress(note).await;
        }
    }
    result(vec![text("Tool with progress executed successfully")])
}

/// `test_sampling`: asks the client's model about `prompt`; its answer as text.
async fn sampling(
    rc: &RequestContext<RoleServer>,
    prompt: String,
) -> Result<CallToolResult, ErrorData> {
    let params = typed(json!({
        "messages": [{"role": "user", "content": {"type": "text", "text": prompt}}],
        "maxTokens": 100}))?;
    let answer = rc
        .peer
        .create_message(params)
        .await
        .map_err(|e| ErrorData::internal_error(format!("sampling: {e}"), None))?;
    let said = serde_json::to_value(&answer.message.content).unwrap_or_default();
    let said = said["text"]
        .as_str()
        .map_or_else(|| said.to_string(), str::to_string);
    result(vec![text(format!("LLM response: {said}"))])
}

/// The form of `test_elicitation_sep1034_defaults`: a field of each type, each with a default.
fn sep1034_defaults_schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {"type": "string", "description": "User status",
                   "enum": ["active", "inactive", "pending"], "default": "active"},
        "verified": {"type": "boolean", "description": "Verification status",
                     "default": true}}})
}

/// The form of `test_elicitation_sep1330_enums`: every way to write a single and a multiple
/// choice.
fn sep1330_enums_schema() -> Value {
    json!({"type": "object", "properties": {
        "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
        "titledSingle": {"type": "string", "oneOf": [
            {"const": "value1", "title": "First Option"},
            {"const": "value2", "title": "Second Option"},
            {"const": "value3", "title": "Third Option"}]},
        "legacyEnum": {"type": "string", "enum": ["opt1", "opt2", "opt3"],
                       "enumNames": ["Option One", "Option Two", "Option Three"]},
        "untitledMulti": {"type": "array", "items": {
            "type": "string", "enum": ["option1", "option2", "option3"]}},
        "titledMulti": {"type": "array", "items": {"anyOf": [
            {"const": "value1", "title": "First Choice"},
            {"const": "value2", "title": "Second Choice"},
            {"const": "value3", "title": "Third Choice"}]}}}})
}

/// Asks the client's user for `schema`'s fields; the answer as text after `label`.
async fn elicit(
    ctx: &ToolCallContext<'_, LastmileMcp>,
    message: String,
    schema: Value,
    label: &str,
) -> Result<CallToolResult, ErrorData> {
    let params = typed(json!({"mode": "form", "message": message, "requestedSchema": schema}))?;
    let answer = ctx
        .request_context
        .peer
        .create_elicitation(params)
        .await
        .map_err(|e| ErrorData::internal_error(format!("elicitation: {e}"), None))?;
    let v = serde_json::to_value(&answer).unwrap_or_default();
    result(vec![text(format!(
        "{label}: action={}, content={}",
        v["action"].as_str().unwrap_or("?"),
        v.get("content").cloned().unwrap_or(Value::Null)
    ))])
}

/// The fixture resources (not templates).
pub(crate) fn resources() -> Vec<Resource> {
    [
        (
            "test://static-text",
            "Static Text Resource",
            "A static text resource",
            "text/plain",
        ),
        (
            "test://static-binary",
            "Static Binary Resource",
            "A PNG image",
            "image/png",
        ),
        (
            "test://watched-resource",
            "Watched Resource",
            "A resource to subscribe to",
            "text/plain",
        ),
    ]
    .into_iter()
    .filter_map(|(uri, name, description, mime)| {
        typed(json!({"uri": uri, "name": name, "description": description, "mimeType": mime})).ok()
    })
    .collect()
}

/// The fixture resource templates.
pub(crate) fn templates() -> Vec<ResourceTemplate> {
    typed(
        json!([{"uriTemplate": "test://template/{id}/data", "name": "Template Resource",
                  "description": "Data for an id", "mimeType": "application/json"}]),
    )
    .unwrap_or_default()
}

/// A fixture resource's contents, if `uri` names one.
pub(crate) fn read(uri: &str) -> Option<Result<ReadResourceResult, ErrorData>> {
    let contents = match uri {
        "test://static-text" => json!({"uri": uri, "mimeType": "text/plain",
                                       "text": "This is the content of the static text resource."}),
        "test://static-binary" => json!({"uri": uri, "mimeType": "image/png", "blob": PNG}),
        "test://watched-resource" => json!({"uri": uri, "mimeType": "text/plain",
                                            "text": "Watched resource content"}),
        _ => {
            let id = uri
                .strip_prefix("test://template/")?
                .strip_suffix("/data")?;
            let data =
                json!({"id": id, "templateTest": true, "data": format!("Data for ID: {id}")});
            json!({"uri": uri, "mimeType": "application/json", "text": data.to_string()})
        }
    };
    Some(done(json!({ "contents": [contents] })))
}

/// The fixture prompts.
pub(crate) fn prompts() -> Vec<Prompt> {
    typed(json!([
        {"name": "test_simple_prompt", "description": "A prompt with no arguments"},
        {"name": "test_prompt_with_arguments", "description": "A prompt with two arguments",
         "arguments": [
            {"name": "arg1", "description": "First test argument", "required": true},
            {"name": "arg2", "description": "Second test argument", "required": true}]},
        {"name": "test_prompt_with_embedded_resource",
         "description": "A prompt that embeds a resource",
         "arguments": [{"name": "resourceUri", "description": "URI of the resource to embed",
                        "required": true}]},
        {"name": "test_prompt_with_image", "description": "A prompt with an image"},
    ]))
    .unwrap_or_default()
}

/// A fixture prompt, if `name` names one.
pub(crate) fn prompt(
    name: &str,
    args: &serde_json::Map<String, Value>,
) -> Option<Result<GetPromptResult, ErrorData>> {
    let arg = |k: &str| args.get(k).and_then(Value::as_str).unwrap_or_default();
    let user = |content: Value| json!({"role": "user", "content": content});
    let messages = match name {
        "test_simple_prompt" => vec![user(text("This is a simple prompt for testing."))],
        "test_prompt_with_arguments" => vec![user(text(format!(
            "Prompt with arguments: arg1='{}', arg2='{}'",
            arg("arg1"),
            arg("arg2")
        )))],
        "test_prompt_with_embedded_resource" => vec![
            user(
                json!({"type": "resource", "resource": {"uri": arg("resourceUri"),
                "mimeType": "text/plain", "text": "Embedded resource content for testing."}}),
            ),
            user(text("Please process the embedded resource above.")),
        ],
        "test_prompt_with_image" => vec![
            user(json!({"type": "image", "data": PNG, "mimeType": "image/png"})),
            user(text("Please analyze the image above.")),
        ],
        _ => return None,
    };
    Some(done(json!({ "messages": messages })))
}

/// Completions for the fixture prompts' arguments, if the request is about one.
pub(crate) fn complete(req: &CompleteRequestParams) -> Option<CompleteResult> {
    let v = serde_json::to_value(req).ok()?;
    if v["ref"]["type"] != "ref/prompt" || v["ref"]["name"] != "test_prompt_with_arguments" {
        return None;
    }
    let prefix = v["argument"]["value"].as_str().unwrap_or_default();
    let values: Vec<&str> = ["paris", "park", "party", "hello", "world"]
        .into_iter()
        .filter(|w| w.starts_with(prefix))
        .collect();
    done(json!({"completion": {"values": values, "total": values.len(), "hasMore": false}})).ok()
}

/// Names a fixture resource URI has (for subscriptions), so real and fixture URIs never clash.
pub(crate) fn is_fixture_uri(uri: &str) -> bool {
    uri.starts_with("test://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_is_a_valid_protocol_value() {
        assert_eq!(tools().list_all().len(), tool_specs().len());
        assert_eq!(resources().len(), 3);
        assert_eq!(templates().len(), 1);
        assert_eq!(prompts().len(), 4);
        for uri in [
            "test://static-text",
            "test://static-binary",
            "test://template/7/data",
        ] {
            assert!(read(uri).unwrap().is_ok(), "{uri}");
        }
        assert!(read("test://nothing").is_none());
        let args = serde_json::Map::new();
        for p in prompts() {
            assert!(prompt(&p.name, &args).unwrap().is_ok(), "{}", p.name);
        }
    }

    #[test]
    fn the_wav_is_a_riff_file() {
        let b = base64::engine::general_purpose::STANDARD
            .decode(wav())
            .unwrap();
        assert_eq!(&b[..4], b"RIFF");
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
            b.len() - 8
        );
    }
}
