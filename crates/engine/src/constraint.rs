//! Constrained decoding: a grammar (a JSON schema, a regular expression or a Lark grammar) is
//! compiled by `llguidance` against the model's vocabulary, and at each step it names the tokens
//! that keep the output inside the grammar. The sampler only ever picks among those, so the text
//! parses by construction, at any temperature.
//!
//! The vocabulary trie and token-set slices are built once per model, on the first grammar (about
//! 0.2 s for a 49k vocabulary); each request then gets its own [`Grammar`] state.
//!
//! A grammar can also name a short way to finish from where it stands ([`Grammar::closing`]:
//! close the open string, the open objects and arrays, add the required keys still missing), so
//! that a constrained answer cut by its token budget still parses: the engine switches to it when
//! the budget left is no more than its length.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{EngineError, GrammarFault, Result};
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
    closers: Arc<ClosingTokens>,
}

impl Clone for Grammar {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            closers: self.closers.clone(),
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
        self.matcher
            .compute_mask_or_eos()
            .map_err(|e| EngineError::grammar(GrammarFault::Runtime, &e.to_string()))
    }

    /// Advances past a sampled token.
    pub(crate) fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher
            .consume_token(token)
            .map_err(|e| EngineError::grammar(GrammarFault::Runtime, &e.to_string()))
    }

    /// Whether the grammar is complete and admits nothing more.
    pub(crate) fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// A short token sequence that completes the grammar from its current state (ending with an
    /// end-of-generation token where the grammar could go on), empty once it is complete; `None`
    /// when none is found within [`MAX_CLOSING_TOKENS`].
    ///
    /// Built greedily on a copy of the state, one step at a time: the bytes the grammar forces
    /// (the rest of a key, a separator), else a character that ends something (`"`, `}`, `]`),
    /// else one that moves on (`,` to a missing key, `0`, `t` of `true`), else the shortest
    /// token allowed; see [`choose`]. Its bytes are then spelled in as few tokens as the
    /// vocabulary allows (`",` is one token, not `"` and `,`). Short, not always the shortest;
    /// a few tens of microseconds for a JSON schema.
    pub(crate) fn closing(&self) -> Option<Vec<u32>> {
        closing_from(&self.matcher, &self.closers)
    }

    /// How much of the budget `closing` needs: all of it but a final end-of-generation token.
    /// Without that token the text is as complete (the grammar accepts it); the token only
    /// stops generation, which the end of the budget does as well.
    pub(crate) fn closing_cost(&self, closing: &[u32]) -> usize {
        let trie = self.closers.env.tok_trie();
        match closing.split_last() {
            Some((&last, text)) if trie.is_special_token(last) => text.len(),
            _ => closing.len(),
        }
    }

    /// A closing of the state after `token` (`None` also when `token` is not allowed), knowing
    /// `previous`, a closing of the current state. Before a search: when `token` spells the start
    /// of `previous` (the model wrote what the grammar forces), the rest of its bytes; else
    /// `previous` itself, which still closes after most tokens (text inside a string).
    pub(crate) fn closing_after(&self, token: u32, previous: &[u32]) -> Option<Vec<u32>> {
        if let Some(rest) = self.rest_after(token, previous) {
            return Some(rest);
        }
        let mut probe = self.matcher.clone();
        if probe.try_consume_tokens(&[token]).ok()? != 1 {
            return None;
        }
        if !previous.is_empty() && probe.validate_tokens(&previous[..1]).ok() == Some(1) {
            // Taken without checking each token first: one that does not fit is an error, which
            // only this copy keeps.
            let mut reuse = probe.clone();
            if reuse.consume_tokens(previous).is_ok() && reuse.is_stopped() {
                return Some(previous.to_vec());
            }
        }
        closing_from(&probe, &self.closers)
    }

    /// The rest of the closing `previous` once `token` has spelled its first bytes: the grammar
    /// reads bytes, so the same bytes however split take it to the same end.
    fn rest_after(&self, token: u32, previous: &[u32]) -> Option<Vec<u32>> {
        let trie = self.closers.env.tok_trie();
        let (text, end) = match previous.split_last() {
            Some((&last, text)) if trie.is_special_token(last) => (text, Some(last)),
            _ => (previous, None),
        };
        if trie.is_special_token(token) || text.iter().any(|&t| trie.is_special_token(t)) {
            return None;
        }
        let bytes = trie.decode_raw(text);
        let rest = bytes.strip_prefix(trie.token(token))?;
        let mut tokens = shortest_spelling(trie, rest)?;
        tokens.extend(end);
        Some(tokens)
    }
}

/// A closing of `m`'s state: found by [`close`] on a copy, then spelled anew by
/// [`shortest_spelling`]. The search takes a token per choice (`"`, then `,`, then the forced
/// ` "unit": "`), where the vocabulary often has one token for several of them (`",`, `"}}`);
/// the grammar reads bytes, so the same bytes in fewer tokens close it the same way (checked on
/// another copy; the search's own spelling stands where that fails).
fn closing_from(m: &Matcher, closers: &ClosingTokens) -> Option<Vec<u32>> {
    // A plain clone shares the lexer's cache with this state (same thread, and the cache only
    // grows), which keeps the copy cheap.
    let found = close(&mut m.clone(), closers)?;
    let trie = closers.env.tok_trie();
    let (text, end) = match found.split_last() {
        Some((&last, text)) if trie.is_special_token(last) => (text, Some(last)),
        _ => (&found[..], None),
    };
    if text.iter().any(|&t| trie.is_special_token(t)) {
        return Some(found);
    }
    let Some(mut respelled) = shortest_spelling(trie, &trie.decode_raw(text)) else {
        return Some(found);
    };
    if respelled.len() >= text.len() {
        return Some(found);
    }
    respelled.extend(end);
    let mut check = m.clone();
    let taken = check.try_consume_tokens(&respelled).ok();
    if taken == Some(respelled.len()) && check.is_stopped() {
        Some(respelled)
    } else {
        Some(found)
    }
}

/// The fewest ordinary tokens that spell `bytes` exactly (among equals, the one with the longer
/// first tokens, as a greedy tokenizer would pick), `None` when some byte has no token. A
/// shortest path over the byte positions: a few microseconds for a closing's hundred bytes.
fn shortest_spelling(trie: &TokTrie, bytes: &[u8]) -> Option<Vec<TokenId>> {
    let n = bytes.len();
    // best[i]: how many tokens spell bytes[i..], and the first of them.
    let mut best: Vec<Option<(usize, TokenId)>> = vec![None; n + 1];
    best[n] = Some((0, 0));
    for i in (0..n).rev() {
        for t in trie.all_prefixes(&bytes[i..]) {
            let len = trie.token_len(t);
            if len == 0 || trie.is_special_token(t) {
                continue;
            }
            if let Some((k, _)) = best[i + len] {
                // Prefixes come shortest first: a longer token wins a tie (`k + 1 <= b`).
                if best[i].is_none_or(|(b, _)| k < b) {
                    best[i] = Some((k + 1, t));
                }
            }
        }
    }
    let mut tokens = Vec::with_capacity(best[0]?.0);
    let mut i = 0;
    while i < n {
        let (_, t) = best[i]?;
        tokens.push(t);
        i += trie.token_len(t);
    }
    Some(tokens)
}

/// The longest closing [`Grammar::closing`] looks for; a state that needs more (or that the
/// greedy search walks in circles from) gets none.
const MAX_CLOSING_TOKENS: usize = 64;

/// Characters that finish JSON values soonest, most closing first: end the string, the object,
/// the array; then separators, which lead to a missing required key (forced from there on) and
/// must come before `0`, which would only lengthen a number; then the shortest values. The
/// first [`ENDERS`] of them always end something; the others can go round in circles (a number
/// that only grows, a letter a pattern repeats), so the search limits how often it picks them.
const CLOSING_CHARS: &[u8] = b"\"}],0:{[tfn";

/// How many of [`CLOSING_CHARS`] come first and always end something.
const ENDERS: usize = 3;

/// How often [`close`] picks one of its own choices that is not an ender before it prefers
/// others.
const MAX_REPEATED_CHOICE: usize = 3;

/// The vocabulary's view for closing grammars: the trie (forced bytes to tokens, token lengths)
/// and the single-character tokens of [`CLOSING_CHARS`], in that order.
struct ClosingTokens {
    env: TokEnv,
    order: Vec<TokenId>,
    /// How many of `order` are enders.
    enders: usize,
    /// Every one-byte token, by id.
    single_bytes: Vec<TokenId>,
}

impl ClosingTokens {
    fn new(env: &TokEnv) -> Self {
        let trie = env.tok_trie();
        let single = |b: &u8| trie.token_id(std::slice::from_ref(b));
        let enders = CLOSING_CHARS[..ENDERS].iter().filter_map(single).count();
        let mut single_bytes: Vec<TokenId> = (0..=u8::MAX).filter_map(|b| single(&b)).collect();
        single_bytes.sort_unstable();
        Self {
            env: env.clone(),
            order: CLOSING_CHARS.iter().filter_map(single).collect(),
            enders,
            single_bytes,
        }
    }

    fn is_ender(&self, t: TokenId) -> bool {
        self.order[..self.enders].contains(&t)
    }

    /// Which of `order` `m` allows next, as bits.
    fn allowed(&self, m: &mut Matcher) -> u32 {
        self.order
            .iter()
            .enumerate()
            .filter(|&(_, &t)| m.validate_tokens(&[t]).is_ok_and(|n| n == 1))
            .fold(0, |bits, (i, _)| bits | 1 << i)
    }
}

/// Drives `m` to the end of its grammar, returning the tokens it took (see
/// [`Grammar::closing`]).
fn close(m: &mut Matcher, closers: &ClosingTokens) -> Option<Vec<u32>> {
    let trie = closers.env.tok_trie();
    let mut out = Vec::new();
    // How often this search picked each token that is not an ender (forced bytes aside).
    let mut picked: Vec<(u32, usize)> = Vec::new();
    let worn = |picked: &[(u32, usize)], t: u32| {
        picked
            .iter()
            .any(|&(p, n)| p == t && n >= MAX_REPEATED_CHOICE)
    };
    while !m.is_stopped() {
        if out.len() >= MAX_CLOSING_TOKENS {
            return None;
        }
        if m.is_accepting().ok()? {
            let eos = trie.eos_token();
            if m.try_consume_tokens(&[eos]).ok()? != 1 {
                return None;
            }
            out.push(eos);
            break;
        }
        let forced = m.compute_ff_bytes();
        if !forced.is_empty() {
            let tokens = trie.greedy_tokenize(&forced);
            let n = m.try_consume_tokens(&tokens).ok()?;
            out.extend_from_slice(&tokens[..n]);
            if n > 0 {
                continue;
            }
        }
        let t = choose(m, closers, |t| worn(&picked, t))?;
        out.push(t);
        if !closers.is_ender(t) {
            match picked.iter_mut().find(|(p, _)| *p == t) {
                Some((_, n)) => *n += 1,
                None => picked.push((t, 1)),
            }
        }
    }
    Some(out)
}

/// Picks (and takes) the next token of a closing where no bytes are forced: an ender if one is
/// allowed (where several are, the first that does not leave them all allowed: `"` inside a
/// string, where the others are text, but `]` after `[`, where `"` would open a string); else
/// the first other closing character that moves on (after it the grammar can end, forces bytes,
/// or allows a closing character it did not: `t` then `rue`, `0` then `}`, `,` then a missing
/// key); else the shortest allowed token (`@`, `.` in a pattern). `worn` names choices to pass
/// by while there are others.
fn choose(m: &mut Matcher, closers: &ClosingTokens, worn: impl Fn(u32) -> bool) -> Option<u32> {
    let (enders, others) = closers.order.split_at(closers.enders);
    let mut allowed: Vec<(u32, Matcher)> = Vec::new();
    for &t in enders {
        let mut probe = m.clone();
        if probe.try_consume_tokens(&[t]).ok()? == 1 {
            allowed.push((t, probe));
        }
    }
    if allowed.len() > 1 {
        let kinds: Vec<u32> = allowed.iter().map(|(t, _)| *t).collect();
        let stays_in_text = |probe: &mut Matcher| {
            kinds
                .iter()
                .all(|&t| probe.clone().try_consume_tokens(&[t]).is_ok_and(|n| n == 1))
        };
        if let Some(i) = allowed.iter_mut().position(|(_, p)| !stays_in_text(p)) {
            allowed.swap(0, i);
        }
    }
    if let Some((t, probe)) = allowed.into_iter().next() {
        *m = probe;
        return Some(t);
    }
    let before = closers.allowed(m);
    let leads_on = |probe: &mut Matcher| {
        probe.is_stopped()
            || probe.is_accepting().unwrap_or(false)
            || !probe.compute_ff_bytes().is_empty()
            || closers.allowed(probe) & !before != 0
    };
    for &t in others.iter().filter(|&&t| !worn(t)) {
        let mut probe = m.clone();
        if probe.try_consume_tokens(&[t]).ok()? == 1 && leads_on(&mut probe) {
            *m = probe;
            return Some(t);
        }
    }
    let t = shortest_allowed(m, closers, &worn)?;
    (m.try_consume_tokens(&[t]).ok()? == 1).then_some(t)
}

/// The allowed token with the fewest bytes (the lowest id among equals), special tokens aside,
/// and tokens `avoid` names too unless nothing else is allowed. One-byte tokens are tried one by
/// one (a few microseconds); the whole mask only when none is allowed.
fn shortest_allowed(
    m: &mut Matcher,
    closers: &ClosingTokens,
    avoid: impl Fn(u32) -> bool,
) -> Option<u32> {
    let mut avoided = None;
    for &t in &closers.single_bytes {
        if m.validate_tokens(&[t]).ok()? == 1 {
            if !avoid(t) {
                return Some(t);
            }
            avoided.get_or_insert(t);
        }
    }
    if avoided.is_some() {
        return avoided;
    }
    let trie = closers.env.tok_trie();
    let mask = m.compute_mask().ok()?;
    // (avoided, length, id): the smallest wins.
    let mut best: Option<(bool, usize, u32)> = None;
    mask.iter_set_entries(|i| {
        let t = i as u32;
        let len = trie.token_len(t);
        if len == 0 || trie.is_special_token(t) {
            return;
        }
        let key = (avoid(t), len, t);
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    });
    best.map(|(_, _, t)| t)
}

/// Compiles grammars for one model's vocabulary.
pub(crate) struct GrammarCompiler {
    tokenizer: Arc<TextTokenizer>,
    factory: OnceLock<std::result::Result<(ParserFactory, Arc<ClosingTokens>), String>>,
}

impl GrammarCompiler {
    pub(crate) fn new(tokenizer: Arc<TextTokenizer>) -> Self {
        Self {
            tokenizer,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<&(ParserFactory, Arc<ClosingTokens>)> {
        self.factory
            .get_or_init(|| {
                let factory = build_factory(&self.tokenizer)?;
                let closers = Arc::new(ClosingTokens::new(factory.tok_env()));
                Ok((factory, closers))
            })
            .as_ref()
            .map_err(|e| EngineError::UnsupportedModel(e.clone()))
    }

    /// Builds the vocabulary index now rather than on the first grammar.
    pub(crate) fn warm(&self) -> Result<()> {
        self.factory().map(|_| ())
    }

    /// A fresh grammar state; a schema or pattern that cannot be compiled is an
    /// [`EngineError::Grammar`] naming the problem.
    pub(crate) fn compile(&self, spec: &GrammarSpec) -> Result<Grammar> {
        let (factory, closers) = self.factory()?;
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
        .map_err(|_| EngineError::grammar(GrammarFault::CompilerFailed, ""))?
        .map_err(|e| EngineError::grammar(GrammarFault::Invalid, &e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::grammar(GrammarFault::Invalid, &e));
        }
        // A grammar that admits nothing (e.g. a rule defined only by itself) fails on its first
        // mask; find out now, as a bad request, not later as a failed generation.
        let mut probe = matcher.deep_clone();
        match probe.compute_mask() {
            Ok(mask) if mask.num_set() > 0 => Ok(Grammar {
                matcher,
                closers: closers.clone(),
            }),
            Ok(_) => Err(EngineError::grammar(GrammarFault::AdmitsNothing, "")),
            Err(e) => Err(EngineError::grammar(
                GrammarFault::AdmitsNothing,
                &e.to_string(),
            )),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Grammars over the default model's vocabulary (the real tokens a closing is made of).
    fn compiler() -> &'static GrammarCompiler {
        static COMPILER: OnceLock<GrammarCompiler> = OnceLock::new();
        COMPILER.get_or_init(|| {
            let path = lastmile_models::ensure_default_model().expect("default model");
            let loaded = crate::loader::LoadedModel::load(&path).expect("load");
            GrammarCompiler::new(Arc::new(loaded.tokenizer))
        })
    }

    /// A grammar that has taken `prefix`.
    fn after(spec: GrammarSpec, prefix: &str) -> Grammar {
        let c = compiler();
        let mut g = c.compile(&spec).expect("compiles");
        for t in c.tokenizer.encode(prefix).expect("encode") {
            if let Err(e) = g.accept(t) {
                panic!("{prefix:?} is not in the grammar: {e}");
            }
        }
        g
    }

    /// The closing's text (an end-of-generation token as `<eos>`), checking that it leaves the
    /// grammar complete.
    fn closing_text(g: &Grammar) -> Option<String> {
        let closing = g.closing()?;
        let mut done = g.clone();
        for &t in &closing {
            done.accept(t).expect("the closing is in the grammar");
        }
        assert!(done.is_finished(), "{closing:?} leaves the grammar open");
        let tok = &compiler().tokenizer;
        let (eos, text): (Vec<u32>, Vec<u32>) =
            closing.iter().partition(|t| tok.eog_ids.contains(t));
        Some(tok.decode(&text).expect("decode") + &"<eos>".repeat(eos.len()))
    }

    fn schema_closing(schema: Value, prefix: &str) -> (String, Value) {
        let g = after(GrammarSpec::JsonSchema(schema), prefix);
        let closing = closing_text(&g).expect("a closing");
        let value = serde_json::from_str(&format!("{prefix}{closing}")).expect("closed JSON");
        (closing, value)
    }

    #[test]
    fn closing_ends_the_open_string_and_object() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}},
            "required": ["a"]});
        let (closing, value) = schema_closing(schema.clone(), r#"{"a": "hel"#);
        assert_eq!(closing, r#""}"#);
        assert_eq!(value, json!({"a": "hel"}));
        // Inside an escape, the quote is taken as text first.
        let (closing, _) = schema_closing(schema.clone(), r#"{"a": "hel\"#);
        assert_eq!(closing, r#"""}"#);
        // Complete: nothing to add.
        let g = after(GrammarSpec::JsonSchema(schema), r#"{"a": "x"}"#);
        assert_eq!(g.closing(), Some(vec![]));
    }

    #[test]
    fn closing_adds_the_required_keys_still_missing() {
        let schema = json!({"type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": false});
        let (closing, value) = schema_closing(schema, r#"{"a": "hel"#);
        assert_eq!(closing, r#"", "b": 0}"#);
        assert_eq!(value, json!({"a": "hel", "b": 0}));
        // A required key the properties do not describe, in an object open to any key: the
        // search must not wander off into empty keys.
        let open = json!({"type": "object", "required": ["id"]});
        let (_, value) = schema_closing(open, r#"{""#);
        assert!(value.get("id").is_some(), "{value}");
    }

    #[test]
    fn closing_finishes_numbers_arrays_enums_and_nesting() {
        let schema = json!({"type": "object", "properties": {
                "n": {"type": "number"},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "colour": {"enum": ["red", "green"]},
                "inner": {"type": "object", "properties": {"x": {"type": "array",
                    "items": {"type": "integer", "minimum": 5}}}, "required": ["x"]}},
            "required": ["n", "tags", "colour", "inner"], "additionalProperties": false});
        for prefix in [
            r#"{"n": 1."#,
            r#"{"n": -"#,
            r#"{"n": 1, "tags": ["a"#,
            r#"{""#,
        ] {
            let (_, v) = schema_closing(schema.clone(), prefix);
            assert!(v["n"].is_number(), "{v}");
            let tags = v["tags"].as_array().expect("tags");
            assert!(tags.len() >= 2 && tags.iter().all(Value::is_string), "{v}");
            assert!(["red", "green"].contains(&v["colour"].as_str().expect("colour")));
            assert!(v["inner"]["x"].is_array(), "{v}");
        }
        let (_, v) = schema_closing(
            schema,
            r#"{"n": 0, "tags": ["a", "b"], "colour": "red", "inner": {"x": [1"#,
        );
        // `1` alone is below the minimum: the number grows first.
        assert!(v["inner"]["x"][0].as_i64().expect("x[0]") >= 5, "{v}");
    }

    #[test]
    fn closing_ends_a_grammar_that_could_go_on_with_end_of_generation() {
        let g = after(GrammarSpec::JsonSchema(json!({"type": "number"})), "12");
        assert_eq!(closing_text(&g).expect("closing"), "<eos>");
        // A rule that can repeat forever: the search must not follow it round.
        let g = after(GrammarSpec::Lark("start: \"a\" start | \"b\"".into()), "aa");
        let text = closing_text(&g).expect("closing");
        assert!(text.ends_with('b'), "{text:?}");
    }

    #[test]
    fn closing_completes_a_pattern_without_following_its_loops() {
        let email = GrammarSpec::Regex(r"[a-z]{1,40}@[a-z]{1,40}\.com".into());
        let g = after(email.clone(), "bob@ex");
        assert_eq!(closing_text(&g).expect("closing"), ".com");
        // Letters could go on forever: the search moves to `@` and `.` instead.
        let g = after(email, "");
        assert_eq!(closing_text(&g).expect("closing"), "a@a.com");
    }

    #[test]
    fn closing_after_a_token_reuses_the_closing_before_it() {
        let schema = json!({"type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "required": ["a", "b"], "additionalProperties": false});
        let g = after(GrammarSpec::JsonSchema(schema), r#"{"a": "hel"#);
        let tok = &compiler().tokenizer;
        let previous = g.closing().expect("closing");
        let text = |ids: Vec<u32>| tok.decode(&ids).expect("decode");
        // Text inside the string: the same closing.
        let word = tok.encode(" lo").expect("encode")[0];
        assert_eq!(g.closing_after(word, &previous), Some(previous.clone()));
        // The model writes the closing's first bytes: the rest of it.
        let quote = tok.token_id("\"").expect("quote");
        let rest = g.closing_after(quote, &previous).expect("closing");
        assert_eq!(text(rest), r#", "b": 0}"#);
        // Without a previous closing, a search finds the same.
        let searched = g.closing_after(quote, &[]).expect("closing");
        assert_eq!(text(searched), r#", "b": 0}"#);
        // A token the grammar does not allow has no closing.
        let brace = tok.token_id("{").expect("brace");
        let mut closed = g.clone();
        closed.accept(quote).expect("quote");
        assert_eq!(closed.closing_after(brace, &[]), None);
    }

    /// The worker's grammar for forced calls of `get_weather` with `args` (`tools.rs`,
    /// `call_grammar`): markup around a JSON body, and with `parallel` more calls allowed after
    /// the first (so a closing ends with end-of-generation).
    fn tool_call_grammar(args: Value, parallel: bool) -> GrammarSpec {
        let body = json!({"anyOf": [{"type": "object",
            "properties": {"name": {"const": "get_weather"}, "arguments": args},
            "required": ["name", "arguments"], "additionalProperties": false}],
            "x-guidance": compact_json_layout()});
        let repeat = if parallel { " (\"\\n\" call)*" } else { "" };
        GrammarSpec::Lark(format!(
            "start: call{repeat}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: %json {body}\n"
        ))
    }

    #[test]
    fn closing_finishes_a_tool_call() {
        let args = json!({"type": "object", "properties": {"city": {"type": "string"},
            "days": {"type": "integer"}}, "required": ["city", "days"]});
        let prefix = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par";
        let g = after(tool_call_grammar(args, true), prefix);
        let text = closing_text(&g).expect("closing");
        assert_eq!(text, "\", \"days\": 0}}\n</tool_call><eos>");
    }

    #[test]
    fn a_closing_takes_no_more_tokens_than_the_tokenizer_spells_its_text_in() {
        // A whole forced call, from the start. The search goes a character at a time (`"`, then
        // `,`; `"`, `}`, `}`): 37 tokens and end-of-generation, more than the 36 a request
        // then needed to get any call. Spelled anew, `",` and `"}` are one token each.
        let args = json!({"type": "object", "properties": {"city": {"type": "string"},
            "unit": {"type": "string", "enum": ["C", "F"]}}, "required": ["city", "unit"]});
        let tok = &compiler().tokenizer;
        for parallel in [true, false] {
            let g = after(tool_call_grammar(args.clone(), parallel), "");
            let closing = g.closing().expect("closing");
            let text = closing_text(&g).expect("closing");
            let call = text.trim_end_matches("<eos>");
            assert_eq!(
                call,
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"\", \"unit\": \"C\"}}\n</tool_call>"
            );
            let spelled = tok.encode(call).expect("encode").len();
            assert!(
                g.closing_cost(&closing) <= spelled,
                "{closing:?}: {spelled}"
            );
            // Only end-of-generation is free.
            assert_eq!(g.closing_cost(&closing), call_tokens(&closing, tok));
        }
        // Text that the model spelled its own way is respelled the short way too.
        let g = after(
            tool_call_grammar(args, true),
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris",
        );
        let closing = g.closing().expect("closing");
        let rest = "\", \"unit\": \"C\"}}\n</tool_call>";
        assert!(
            closing.len() <= tok.encode(rest).expect("encode").len() + 1,
            "{closing:?}"
        );
    }

    /// How many of `closing` are not end-of-generation tokens.
    fn call_tokens(closing: &[u32], tok: &TextTokenizer) -> usize {
        closing.iter().filter(|t| !tok.eog_ids.contains(t)).count()
    }

    #[test]
    fn shortest_spelling_finds_the_fewest_tokens() {
        let trie = compiler()
            .factory()
            .expect("factory")
            .0
            .tok_env()
            .tok_trie()
            .clone();
        let tok = &compiler().tokenizer;
        for text in [
            "\", \"unit\": \"C\"}}\n</tool_call>",
            "\"}",
            "héllo wörld",
            "",
        ] {
            let spelled = shortest_spelling(&trie, text.as_bytes()).expect("spelled");
            assert_eq!(trie.decode_raw(&spelled), text.as_bytes());
            assert!(spelled.len() <= trie.greedy_tokenize(text.as_bytes()).len());
            assert!(
                spelled.len() <= tok.encode(text).expect("encode").len(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_closing_longer_than_the_search_allows_is_none() {
        let schema = json!({"type": "object", "properties": {
            "s": {"type": "string", "minLength": 200}}, "required": ["s"]});
        let g = after(GrammarSpec::JsonSchema(schema), r#"{"s": "a"#);
        assert_eq!(g.closing(), None);
    }
}
