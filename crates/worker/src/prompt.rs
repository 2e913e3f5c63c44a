//! Public requests become prompt tokens here, and only here: the chat template with tool
//! definitions, untrusted text quoted so it never becomes a control token, then the tokenizer.
//! The worker's endpoints use it, and so does the gateway: under `kv_aware` routing it loads each
//! model's [`PromptCard`] (tokenizer and template, no weights) from a worker once, tokenizes each
//! request itself to find the worker that holds its prefix, and hands the tokens on in the
//! [`PROMPT_HEADER`], so the chosen worker does not tokenize again.
//!
//! The header names the card's fingerprint; a worker uses the tokens only when the fingerprint
//! is its own (same tokenizer, template and block size) and every id is in its vocabulary, and
//! tokenizes the request itself otherwise. Workers are internal endpoints (the gateway is where
//! keys are checked): whoever can reach one can already send it token ids on `/v1/completions`.

use std::sync::Arc;

use base64::Engine as _;
use lastmile_engine::chat_template::ChatTemplate;
use lastmile_engine::tokenizer::{SpecialFacts, TextTokenizer};
use lastmile_protocol::anthropic::MessagesRequest;
use lastmile_protocol::{
    parse_json, ApiError, ChatCompletionRequest, CompletionRequest, PromptRef,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::WorkerError;
use crate::tools::{template_messages, ToolSetup};

/// The request header that carries a prompt's tokens from the gateway to a worker:
/// `<fingerprint>:<token ids, little-endian u32, base64>`.
pub const PROMPT_HEADER: &str = "x-lastmile-prompt";

/// Longest prompt sent in the header (base64 of 4 bytes a token: about 175 KB, well inside the
/// HTTP server's header buffer); longer prompts are tokenized again by the worker.
pub const MAX_HEADER_TOKENS: usize = 32 * 1024;

/// Which public API a request body was written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
    /// `/v1/messages` (Anthropic)
    Messages,
}

impl Api {
    /// The API a request path belongs to (`None`: not a generation endpoint).
    pub fn of_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::Chat),
            "/v1/completions" => Some(Self::Completions),
            "/v1/messages" => Some(Self::Messages),
            _ => None,
        }
    }
}

/// What another process needs to build a model's prompts as its workers do: the tokenizer (a
/// Hugging Face `tokenizer.json` document and its special-token facts), the chat template, the KV
/// block size, and a fingerprint of all of it. Served by workers at `GET /internal/prompt-card`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptCard {
    /// SHA-256 (hex, first 16 bytes) of everything below.
    pub fingerprint: String,
    /// Tokens per KV block (the unit of prefix hashes).
    pub block_size: usize,
    /// The tokenizer as a Hugging Face `tokenizer.json` document.
    pub tokenizer: String,
    /// Its special tokens.
    pub special: SpecialFacts,
    /// The chat template's Jinja source.
    pub chat_template: String,
}

impl PromptCard {
    fn fingerprint_of(
        tokenizer: &str,
        special: &SpecialFacts,
        template: &str,
        bs: usize,
    ) -> String {
        let mut h = Sha256::new();
        for part in [
            tokenizer.as_bytes(),
            serde_json::to_string(special)
                .unwrap_or_default()
                .as_bytes(),
            template.as_bytes(),
            &bs.to_le_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Builds a model's prompts.
pub struct Prompter {
    tokenizer: Arc<TextTokenizer>,
    template: Arc<ChatTemplate>,
    block_size: usize,
    /// The card (and with it the fingerprint), made on first use: serializing a large
    /// vocabulary takes tens of milliseconds that a cold start should not pay.
    card: std::sync::OnceLock<Result<Arc<PromptCard>, String>>,
}

impl Prompter {
    /// A prompter over a loaded tokenizer and template.
    pub fn new(
        tokenizer: Arc<TextTokenizer>,
        template: Arc<ChatTemplate>,
        block_size: usize,
    ) -> Self {
        Self {
            tokenizer,
            template,
            block_size,
            card: std::sync::OnceLock::new(),
        }
    }

    /// Rebuilds the prompter a worker described (the template is vetted as at model load: a
    /// card comes from another process and is not trusted to render in bounded time).
    pub fn from_card(card: PromptCard) -> Result<Self, WorkerError> {
        let PromptCard {
            fingerprint,
            block_size,
            tokenizer,
            special,
            chat_template,
        } = card;
        if block_size == 0 {
            return Err(ApiError::invalid_request("a prompt card's block size is 0", None).into());
        }
        let expect = PromptCard::fingerprint_of(&tokenizer, &special, &chat_template, block_size);
        if expect != fingerprint {
            return Err(ApiError::invalid_request(
                "a prompt card's fingerprint does not match it",
                None,
            )
            .into());
        }
        let (bos, eos) = (special.bos_text.clone(), special.eos_text.clone());
        ChatTemplate::vet(&chat_template, bos.as_deref(), eos.as_deref())?;
        let template = ChatTemplate::new(&chat_template, bos.as_deref(), eos.as_deref())?;
        let tok = TextTokenizer::from_json(&tokenizer, special.clone())?;
        let me = Self::new(Arc::new(tok), Arc::new(template), block_size);
        let card = PromptCard {
            fingerprint,
            block_size,
            tokenizer,
            special,
            chat_template,
        };
        let _ = me.card.set(Ok(Arc::new(card)));
        Ok(me)
    }

    /// This prompter's card (made once).
    pub fn card(&self) -> Result<Arc<PromptCard>, WorkerError> {
        self.card
            .get_or_init(|| {
                let tokenizer = self.tokenizer.to_json().map_err(|e| e.to_string())?;
                let special = self.tokenizer.special_facts();
                let chat_template = self.template.source().to_string();
                Ok(Arc::new(PromptCard {
                    fingerprint: PromptCard::fingerprint_of(
                        &tokenizer,
                        &special,
                        &chat_template,
                        self.block_size,
                    ),
                    block_size: self.block_size,
                    tokenizer,
                    special,
                    chat_template,
                }))
            })
            .clone()
            .map_err(|e| ApiError::internal(format!("describing the tokenizer: {e}")).into())
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The chat template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The prompt of a chat request with its tools set up: rendered by the template with only
    /// the template's markup as control tokens, then tokenized.
    pub(crate) fn chat(
        &self,
        req: &ChatCompletionRequest,
        tools: Option<&ToolSetup>,
    ) -> Result<Vec<u32>, WorkerError> {
        let tok = &self.tokenizer;
        let (messages, tool_defs) = template_messages(req, tools, self.template.tool_style())?;
        // What clients and tools wrote never becomes a control token: only the template's markup.
        let messages = tok.quote_untrusted(&messages)?;
        let tool_defs = tool_defs.map(|t| tok.quote_untrusted(&t)).transpose()?;
        let rendered = self
            .template
            .render_with_tools(&messages, tool_defs.as_ref(), true)?;
        Ok(tok.encode_chat(&rendered)?)
    }

    fn chat_with_tools(&self, req: &ChatCompletionRequest) -> Result<Vec<u32>, WorkerError> {
        req.validate()?;
        let tools = ToolSetup::from_request(req, self.template.tool_style())?;
        self.chat(req, tools.as_ref())
    }

    /// The prompt tokens of a request body for `api`, as that endpoint builds them.
    pub fn tokens(&self, api: Api, body: &[u8]) -> Result<Vec<u32>, WorkerError> {
        match api {
            Api::Chat => self.chat_with_tools(&parse_json(body)?),
            Api::Messages => {
                let req: MessagesRequest = parse_json(body)?;
                let chat = req
                    .to_chat()
                    .map_err(|e| ApiError::invalid_request(e.message, None))?;
                self.chat_with_tools(&chat)
            }
            Api::Completions => {
                let req: CompletionRequest = parse_json(body)?;
                req.validate()?;
                match req.prompt.single() {
                    Some(PromptRef::Tokens(ids)) => Ok(ids.to_vec()),
                    Some(PromptRef::Text(t)) => Ok(self.tokenizer.encode_prompt(t)?),
                    None => Err(ApiError::unsupported("multiple prompts", "prompt").into()),
                }
            }
        }
    }

    /// The [`PROMPT_HEADER`] value carrying `tokens` under this prompter's card (`None` for a
    /// prompt longer than [`MAX_HEADER_TOKENS`], or when the card cannot be made).
    pub fn header(&self, tokens: &[u32]) -> Option<String> {
        if tokens.len() > MAX_HEADER_TOKENS {
            return None;
        }
        let card = self.card().ok()?;
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let ids = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        Some(format!("{}:{ids}", card.fingerprint))
    }

    /// The tokens a [`PROMPT_HEADER`] value carries, if it was made under this prompter's card
    /// and names only tokens of its vocabulary; `None` otherwise (tokenize the request instead).
    pub fn read_header(&self, value: &str) -> Option<Vec<u32>> {
        let (fingerprint, ids) = value.split_once(':')?;
        if fingerprint != self.card().ok()?.fingerprint {
            return None;
        }
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(ids)
            .ok()?;
        if bytes.is_empty() || bytes.len() % 4 != 0 {
            return None;
        }
        let vocab = self.tokenizer.vocab_size();
        let tokens: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        tokens
            .iter()
            .all(|&t| (t as usize) < vocab)
            .then_some(tokens)
    }
}
