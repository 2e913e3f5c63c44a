//! The worker's internal API for the gateway: `POST /internal/prompt` turns a public request
//! (chat, completion or Anthropic message) into the prompt this worker would compute — its
//! length and the hashes of its full KV blocks, named as the engine's prefix cache and KV events
//! name them — so a KV-aware router can see which worker already holds it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use lastmile_protocol::anthropic::MessagesRequest;
use lastmile_protocol::{
    parse_json, prefix_hashes, ApiError, ChatCompletionRequest, CompletionRequest, PromptRef,
};
use serde_json::{json, Value};

use crate::error::{api_response, WorkerError};
use crate::openai::{chat_prompt, read_body};
use crate::tools::ToolSetup;
use crate::AppState;

/// Which public API a body was written for.
fn api_of(v: &Value) -> Result<&str, ApiError> {
    v.get("api").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid_request(
            "`api` must be \"chat\", \"completions\" or \"messages\"",
            Some("api"),
        )
    })
}

fn chat_tokens(state: &AppState, req: &ChatCompletionRequest) -> Result<Vec<u32>, WorkerError> {
    req.validate()?;
    let tools = ToolSetup::from_request(req, state.engine.template().tool_style())?;
    chat_prompt(state, req, tools.as_ref())
}

/// The prompt tokens of `body` under `api`, as the public endpoint would build them.
fn prompt_tokens(state: &AppState, api: &str, body: Value) -> Result<Vec<u32>, WorkerError> {
    let text = body.to_string();
    match api {
        "chat" => chat_tokens(state, &parse_json(text.as_bytes())?),
        "messages" => {
            let req: MessagesRequest = parse_json(text.as_bytes())?;
            let chat = req
                .to_chat()
                .map_err(|e| ApiError::invalid_request(e.message, None))?;
            chat_tokens(state, &chat)
        }
        "completions" => {
            let req: CompletionRequest = parse_json(text.as_bytes())?;
            req.validate()?;
            match req.prompt.single() {
                Some(PromptRef::Tokens(ids)) => Ok(ids.to_vec()),
                Some(PromptRef::Text(t)) => Ok(state.engine.tokenizer().encode_prompt(t)?),
                None => Err(ApiError::unsupported("multiple prompts", "prompt").into()),
            }
        }
        other => Err(ApiError::invalid_request(
            format!("unknown api {other:?} (chat, completions, messages)"),
            Some("api"),
        )
        .into()),
    }
}

pub(crate) async fn prompt(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let result = async {
        let bytes = read_body(req, state.config.max_body_bytes).await?;
        let mut v: Value = parse_json(&bytes)?;
        let api = api_of(&v)?.to_string();
        let body = v.get_mut("body").map(Value::take).ok_or_else(|| {
            ApiError::invalid_request("`body` must hold the public request", Some("body"))
        })?;
        let st = state.clone();
        let tokens = tokio::task::spawn_blocking(move || prompt_tokens(&st, &api, body))
            .await
            .map_err(|e| ApiError::internal(format!("prompt task failed: {e}")))??;
        let block_size = state.engine.info().block_size;
        Ok::<_, WorkerError>(json!({
            "prompt_tokens": tokens.len(),
            "block_size": block_size,
            "block_hashes": prefix_hashes(&tokens, block_size),
        }))
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => api_response(&e.to_api()),
    }
}
