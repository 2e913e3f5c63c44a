//! Turning the engine output of each choice into what the client sees: answer text, tool calls
//! read out of the text, log probabilities in the endpoint's shape, and the finish reason.
//! [`ChoiceBuilder`] is fed piece by piece; each feed returns an [`Update`] that a stream frames
//! as chunks, and a whole response simply accumulates.

use lastmile_engine::tokenizer::TextTokenizer;
use lastmile_engine::TokenLogprobs;
use lastmile_protocol::{
    AssistantMessage, ChatChoice, ChatLogprobs, ChatTokenLogprob, CompletionChoice,
    CompletionLogprobs, FinishReason, TokenText, ToolCall,
};

use crate::tools::{ToolCallParser, ToolOutput, ToolSetup};

/// Which log-probability shape a choice reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogprobStyle {
    /// None asked for.
    Off,
    /// Chat: per-token objects with bytes.
    Chat,
    /// Legacy completions: parallel arrays with text offsets.
    Completion,
}

/// What one feed produced.
#[derive(Default)]
pub(crate) struct Update {
    /// New answer text (may be empty).
    pub(crate) text: String,
    /// Calls completed by this feed.
    pub(crate) calls: Vec<ToolCall>,
    /// Chat log probabilities of the tokens in this feed.
    pub(crate) chat_logprobs: Option<ChatLogprobs>,
    /// Completion log probabilities of the tokens in this feed.
    pub(crate) completion_logprobs: Option<CompletionLogprobs>,
}

impl Update {
    /// Whether a chunk should carry it.
    pub(crate) fn is_empty(&self) -> bool {
        self.text.is_empty()
            && self.calls.is_empty()
            && self.chat_logprobs.is_none()
            && self.completion_logprobs.is_none()
    }
}

/// The output of one choice, built as the engine streams it.
pub(crate) struct ChoiceBuilder {
    pub(crate) index: u32,
    /// The stop string that ended the choice, once it has ended on one.
    pub(crate) stop_sequence: Option<String>,
    parser: Option<ToolCallParser>,
    style: LogprobStyle,
    /// Characters of text so far (legacy `text_offset`).
    offset: usize,
    /// Characters of the echoed prompt covered by prompt log probabilities so far.
    prompt_offset: usize,
    text: String,
    calls: Vec<ToolCall>,
    chat_logprobs: Vec<ChatTokenLogprob>,
    completion_logprobs: CompletionLogprobs,
}

impl ChoiceBuilder {
    /// A choice; `tools` turns on reading tool calls out of the text. `prefix` is text the
    /// choice starts with (echoed prompts), counted in text offsets.
    pub(crate) fn new(
        index: u32,
        tools: Option<&ToolSetup>,
        style: LogprobStyle,
        prefix: &str,
    ) -> Self {
        Self {
            index,
            stop_sequence: None,
            parser: tools.map(ToolCallParser::new),
            style,
            offset: prefix.chars().count(),
            prompt_offset: 0,
            text: prefix.to_string(),
            calls: Vec::new(),
            chat_logprobs: Vec::new(),
            completion_logprobs: CompletionLogprobs::default(),
        }
    }

    /// Starts prompt log probabilities (echo with logprobs) with the prompt's first token, which
    /// has none.
    pub(crate) fn start_prompt_logprobs(&mut self, first: u32, tok: &TextTokenizer) {
        let token = TokenText::from_bytes(tok.piece(first));
        self.prompt_offset = token.text.chars().count();
        self.completion_logprobs.push_unscored(token, 0);
    }

    /// Adds log probabilities of prompt tokens (after the first), in prompt order.
    pub(crate) fn push_prompt(
        &mut self,
        entries: Vec<(u32, TokenLogprobs)>,
        tok: &TextTokenizer,
    ) -> Update {
        let name = |t: u32| TokenText::from_bytes(tok.piece(t));
        let mut batch = CompletionLogprobs::default();
        for (id, lp) in entries {
            let top = lp.top.iter().map(|&(t, l)| (name(t), l)).collect();
            let token = name(id);
            let width = token.text.chars().count();
            batch.push(token, lp.logprob, top, self.prompt_offset);
            self.prompt_offset += width;
        }
        self.completion_logprobs.append(batch.clone());
        Update {
            completion_logprobs: Some(batch),
            ..Update::default()
        }
    }

    /// Adds a piece of generated text and, when asked for, its token's log probabilities.
    pub(crate) fn push(
        &mut self,
        text: &str,
        token: Option<(u32, TokenLogprobs)>,
        tok: &TextTokenizer,
    ) -> Update {
        let mut update = Update::default();
        if let Some((id, lp)) = token {
            let name = |t: u32| TokenText::from_bytes(tok.piece(t));
            let top: Vec<(TokenText, f32)> = lp.top.iter().map(|&(t, l)| (name(t), l)).collect();
            match self.style {
                LogprobStyle::Off => {}
                LogprobStyle::Chat => {
                    let entry = ChatTokenLogprob::new(name(id), lp.logprob, top);
                    self.chat_logprobs.push(entry.clone());
                    update.chat_logprobs = Some(ChatLogprobs {
                        content: vec![entry],
                        refusal: None,
                    });
                }
                LogprobStyle::Completion => {
                    let mut one = CompletionLogprobs::default();
                    one.push(name(id), lp.logprob, top, self.offset);
                    self.completion_logprobs.append(one.clone());
                    update.completion_logprobs = Some(one);
                }
            }
        }
        self.offset += text.chars().count();
        let outputs = match &mut self.parser {
            Some(p) => p.push(text),
            None => vec![ToolOutput::Text(text.to_string())],
        };
        self.absorb(outputs, &mut update);
        update
    }

    /// Releases held-back text at the end and settles the finish reason (`tool_calls` when the
    /// model called a tool and was not cut off).
    pub(crate) fn finish(&mut self, reason: FinishReason) -> (Update, FinishReason) {
        let mut update = Update::default();
        if let Some(p) = &mut self.parser {
            let outputs = p.finish();
            self.absorb(outputs, &mut update);
        }
        let reason = if !self.calls.is_empty() && reason == FinishReason::Stop {
            FinishReason::ToolCalls
        } else {
            reason
        };
        (update, reason)
    }

    fn absorb(&mut self, outputs: Vec<ToolOutput>, update: &mut Update) {
        for o in outputs {
            match o {
                ToolOutput::Text(t) => {
                    self.text.push_str(&t);
                    update.text.push_str(&t);
                }
                ToolOutput::Call(c) => {
                    self.calls.push(c.clone());
                    update.calls.push(c);
                }
            }
        }
    }

    /// The whole text so far.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The finished message: text and tool calls.
    pub(crate) fn into_message(self) -> (String, Vec<ToolCall>) {
        (self.text, self.calls)
    }

    /// The finished chat choice.
    pub(crate) fn into_chat(self, reason: FinishReason) -> ChatChoice {
        ChatChoice {
            index: self.index,
            message: AssistantMessage::with_tool_calls(self.text, self.calls),
            logprobs: (self.style == LogprobStyle::Chat).then_some(ChatLogprobs {
                content: self.chat_logprobs,
                refusal: None,
            }),
            finish_reason: reason,
        }
    }

    /// The finished completion choice.
    pub(crate) fn into_completion(self, reason: FinishReason) -> CompletionChoice {
        CompletionChoice {
            text: self.text,
            index: self.index,
            logprobs: (self.style == LogprobStyle::Completion).then_some(self.completion_logprobs),
            finish_reason: reason,
        }
    }
}
