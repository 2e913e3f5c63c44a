//! Everything a request body goes through before the engine runs it — parsing, validation,
//! tools, the chat template over untrusted messages, tokenization, grammar compilation, the
//! context budget, and the gateway's quota reading — without generating: the target of the
//! request fuzzers (`fuzz/`) and of the corpus replay that runs with the tests.

use std::sync::Arc;

use lastmile_engine::EngineHandle;
use lastmile_protocol::anthropic::{CountTokensRequest, MessagesRequest};
use lastmile_protocol::{parse_json, ChatCompletionRequest, TokenReservation};

use crate::{AppState, ServerConfig};

/// A worker's request preparation over one engine, on its own runtime.
pub struct Harness {
    state: Arc<AppState>,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    /// A harness over `engine`, serving it as `model_id`.
    pub fn new(engine: EngineHandle, model_id: &str) -> Self {
        Self {
            state: Arc::new(AppState::new(
                engine,
                ServerConfig {
                    model_id: model_id.to_string(),
                    max_body_bytes: 16 << 20,
                    startup_ms: Vec::new(),
                    disagg: Default::default(),
                },
            )),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime"),
        }
    }

    /// Prepares `body` as a request to `path` (`/v1/chat/completions`, `/v1/completions`,
    /// `/v1/messages`, `/v1/messages/count_tokens`): `Ok` when the worker would run it, `Err` with the status it would answer
    /// otherwise. A panic or a hang is a bug.
    pub fn prepare(&self, path: &str, body: &[u8]) -> Result<(), u16> {
        // The gateway reads the quota fields of every body, JSON or not.
        let _ = TokenReservation::of(path, body);
        let state = &self.state;
        self.rt.block_on(async {
            match path {
                "/v1/chat/completions" => {
                    let req: ChatCompletionRequest = parse_json(body).map_err(|e| e.status)?;
                    crate::openai::prepare_chat_request(state, req, None)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_api().status)
                }
                "/v1/completions" => crate::openai::prepare_completion(state, body, None)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_api().status),
                "/v1/messages" | "/v1/messages/count_tokens" => {
                    let chat = if path.ends_with("/count_tokens") {
                        let req: CountTokensRequest = parse_json(body).map_err(|e| e.status)?;
                        req.to_chat()
                    } else {
                        let req: MessagesRequest = parse_json(body).map_err(|e| e.status)?;
                        req.to_chat()
                    }
                    .map_err(|e| e.status)?;
                    crate::openai::prepare_chat_request(state, chat, None)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_api().status)
                }
                _ => Err(404),
            }
        })
    }
}
