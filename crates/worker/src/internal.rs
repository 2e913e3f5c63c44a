//! The worker's internal API for the gateway: `GET /internal/prompt-card` describes how this
//! worker builds prompts (tokenizer, chat template, KV block size; see [`crate::prompt`]), so a
//! KV-aware gateway can tokenize requests itself, find the worker that holds their prefix, and
//! hand the tokens on.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use lastmile_protocol::ApiError;

use crate::error::{api_response, WorkerError};
use crate::AppState;

pub(crate) async fn prompt_card(State(state): State<Arc<AppState>>) -> Response {
    let card = tokio::task::spawn_blocking(move || state.prompter.card())
        .await
        .map_err(|e| WorkerError::from(ApiError::internal(format!("prompt card task failed: {e}"))))
        .and_then(|c| c);
    match card {
        Ok(card) => axum::Json(&*card).into_response(),
        Err(e) => api_response(&e.to_api()),
    }
}
