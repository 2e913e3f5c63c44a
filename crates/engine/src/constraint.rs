//! Constrained decoding: a grammar (a JSON schema, a regular expression or a Lark grammar) is
//! compiled by `llguidance` against the model's vocabulary, and at each step it names the tokens
//! that keep the output inside the grammar. The sampler only ever picks among those, so the text
//! parses by construction, at any temperature.
//!
//! The vocabulary trie and token-set slices are built once per model, on the first grammar (about
//! 0.2 s for a 49k vocabulary); each request then gets its own [`Grammar`] state.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{EngineError, Result};
use crate::tokenizer::TextTokenizer;

/// The JSON layout given to schemas that do not choose their own (`x-guidance`): one line, with
/// `", "` and `": "` as Python's `json.dumps` writes them (what models saw in training), and no
/// room for runaway whitespace, which a small model at a high temperature would otherwise pad
/// its answer with until `max_tokens`.
pub fn compact_json_layout() -> Value {
    serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// JSON text valid against this JSON Schema (`{"type": "object"}` for any object), laid out
    /// as `compact_json_layout` says unless the schema has its own `x-guidance` options.
    JsonSchema(Value),
    /// Text matching this regular expression (whole output).
    Regex(String),
    /// A Lark grammar in llguidance's dialect (`%json { … }` embeds a JSON schema).
    Lark(String),
}

/// One request's grammar state: which tokens may come next.
pub struct Grammar {
    matcher: Matcher,
}

impl Clone for Grammar {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
        }
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Grammar {
    /// The tokens allowed next (end-of-generation tokens once the grammar is complete).
    pub(crate) fn allowed(&mut self) -> Result<SimpleVob> {
        self.matcher.compute_mask_or_eos().map_err(|e| {
            EngineError::InvalidRequest(format!("grammar: {}", first_line(&e.to_string())))
        })
    }

    /// Advances past a sampled token.
    pub(crate) fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| {
            EngineError::InvalidRequest(format!("grammar: {}", first_line(&e.to_string())))
        })
    }

    /// Whether the grammar is complete and admits nothing more.
    pub(crate) fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// Compiles grammars for one model's vocabulary.
pub(crate) struct GrammarCompiler {
    tokenizer: Arc<TextTokenizer>,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

impl GrammarCompiler {
    pub(crate) fn new(tokenizer: Arc<TextTokenizer>) -> Self {
        Self {
            tokenizer,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&ParserFactory> {
        self.factory
            .get_or_init(|| build_factory(&self.tokenizer))
            .as_ref()
            .map_err(|e| EngineError::UnsupportedModel(e.clone()))
    }

    /// Builds the vocabulary index now rather than on the first grammar.
    pub(crate) fn warm(&self) -> Result<()> {
        self.factory().map(|_| ())
    }

    /// A fresh grammar state; a schema or pattern that cannot be compiled is an `InvalidRequest`
    /// naming the problem.
    pub(crate) fn compile(&self, spec: &GrammarSpec) -> Result<Grammar> {
        let factory = self.factory()?;
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(obj) = schema.as_object_mut() {
                    obj.entry("x-guidance").or_insert_with(compact_json_layout);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        // Compilation walks user-supplied schemas; a panic in it must not take the caller down.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            factory.create_parser(grammar)
        }))
        .map_err(|_| EngineError::InvalidRequest("the grammar could not be compiled".into()))?
        .map_err(|e| {
            EngineError::InvalidRequest(format!("invalid grammar: {}", first_line(&e.to_string())))
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::InvalidRequest(format!(
                "invalid grammar: {}",
                first_line(&e)
            )));
        }
        // A grammar that admits nothing (e.g. a rule defined only by itself) fails on its first
        // mask; find out now, as a bad request, not later as a failed generation.
        let mut probe = matcher.deep_clone();
        match probe.compute_mask() {
            Ok(mask) if mask.num_set() > 0 => Ok(Grammar { matcher }),
            Ok(_) => Err(EngineError::InvalidRequest(
                "the grammar admits no output".into(),
            )),
            Err(e) => Err(EngineError::InvalidRequest(format!(
                "the grammar admits no output: {}",
                first_line(&e.to_string())
            ))),
        }
    }
}

/// llguidance errors carry a multi-line parser dump after the message; clients get the message.
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message)
}

/// The tokenizer as llguidance sees it: a byte trie over the vocabulary, and our tokenizer for
/// turning forced text into canonical tokens.
struct VocabularyEnv {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for VocabularyEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

fn build_factory(tokenizer: &Arc<TextTokenizer>) -> std::result::Result<ParserFactory, String> {
    let words: Vec<Vec<u8>> = tokenizer
        .pieces()
        .iter()
        .map(|p| {
            if p.special {
                let mut b = Vec::with_capacity(p.bytes.len() + 1);
                b.push(TokTrie::SPECIAL_TOKEN_MARKER);
                b.extend_from_slice(&p.bytes);
                b
            } else {
                p.bytes.clone()
            }
        })
        .collect();
    let mut eos: Vec<u32> = tokenizer
        .eog_ids
        .iter()
        .copied()
        .filter(|&t| (t as usize) < words.len())
        .collect();
    eos.sort_unstable();
    let Some(&first) = eos.first() else {
        return Err("the model has no end-of-generation token to end a grammar with".into());
    };
    let info = TokRxInfo::new(words.len() as u32, first);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
    let env: TokEnv = Arc::new(VocabularyEnv {
        trie,
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}
