//! Tool calling over a model that speaks in text: putting tool definitions, past calls and tool
//! results into the prompt, constraining a forced call with a grammar, and reading the calls back
//! out of the generated text.
//!
//! The wire format is the `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` convention
//! that SmolLM2, Qwen and Hermes models are trained on. A chat template that renders tools itself
//! (it mentions `tools` and `tool_call`) gets the tools and structured calls; otherwise the
//! server writes them into the conversation as text in that same format. A bare JSON object
//! `{"name": ..., "parameters"|"arguments": ...}` as the whole answer (Llama 3's style) is also
//! read as a call, and is the forced format for templates that render tools without tags.

use lastmile_engine::chat_template::ToolStyle;
use lastmile_protocol::{ApiError, ChatCompletionRequest, Role, Tool, ToolCall, ToolChoice};
use serde_json::{json, Value};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// The tools of one chat request, as the server will use them.
pub(crate) struct ToolSetup {
    pub(crate) tools: Vec<Tool>,
    pub(crate) choice: ToolChoice,
    pub(crate) parallel: bool,
    /// How the chat template renders tools (and so how calls are written).
    pub(crate) style: ToolStyle,
}

impl ToolSetup {
    /// Reads (already validated) tool fields; `None` when no tools can be called.
    pub(crate) fn from_request(
        req: &ChatCompletionRequest,
        style: ToolStyle,
    ) -> Result<Option<Self>, ApiError> {
        let tools = req.typed_tools()?;
        let choice = req.typed_tool_choice()?;
        if tools.is_empty() || choice == ToolChoice::None {
            return Ok(None);
        }
        Ok(Some(Self {
            tools,
            choice,
            parallel: req.parallel_tool_calls.unwrap_or(true),
            style,
        }))
    }

    /// The tools the model is told about (only the named one when a function is forced).
    fn offered(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(move |t| match &self.choice {
            ToolChoice::Function(name) => &t.function.name == name,
            _ => true,
        })
    }

    /// With `required` or a named function: a Lark grammar that only admits well-formed calls
    /// whose arguments follow the function's schema.
    pub(crate) fn forced_grammar(&self) -> Option<String> {
        if !matches!(self.choice, ToolChoice::Required | ToolChoice::Function(_)) {
            return None;
        }
        Some(self.call_grammar())
    }

    /// The grammar of the calls to the offered tools, in the template's format: one or more
    /// `<tool_call>` blocks, or (Llama 3 style) one bare `{"name": …, "parameters": …}` object.
    /// Compiled for every request with tools, so an invalid parameter schema is refused up front.
    pub(crate) fn call_grammar(&self) -> String {
        let bare = self.style == ToolStyle::BareJson;
        let args_key = if bare { "parameters" } else { "arguments" };
        let variants: Vec<Value> = self
            .offered()
            .map(|t| {
                let mut properties = serde_json::Map::new();
                properties.insert("name".into(), json!({"const": t.function.name}));
                properties.insert(args_key.into(), t.parameters());
                json!({"type": "object", "properties": properties,
                    "required": ["name", args_key], "additionalProperties": false})
            })
            .collect();
        let mut schema = json!({"anyOf": variants});
        // Inside Lark the engine's default layout does not apply: set it here.
        schema["x-guidance"] = lastmile_engine::constraint::compact_json_layout();
        if bare {
            return format!("start: body\nbody: %json {schema}\n");
        }
        let repeat = if self.parallel {
            " (\"\\n\" call)*"
        } else {
            ""
        };
        format!(
            "start: call{repeat}\ncall: \"{CALL_OPEN}\\n\" body \"\\n{CALL_CLOSE}\"\nbody: %json {schema}\n"
        )
    }

    /// Instructions and signatures for a template that does not render tools itself.
    fn system_text(&self) -> String {
        let mut text = String::from(
            "# Tools\n\nYou can call functions to help answer. Their signatures, one JSON object \
             per line, are inside <tools></tools>:\n<tools>\n",
        );
        for t in self.offered() {
            text.push_str(&spaced_json(&serde_json::to_value(t).unwrap_or_default()));
            text.push('\n');
        }
        text.push_str(
            "</tools>\n\nTo call a function, answer with a JSON object holding its name and \
             arguments inside <tool_call></tool_call> tags, one call per tag pair:\n<tool_call>\n\
             {\"name\": \"function name\", \"arguments\": {\"argument\": \"value\"}}\n</tool_call>",
        );
        text
    }
}

/// The conversation as the chat template receives it, and the tools to pass it.
pub(crate) fn template_messages(
    req: &ChatCompletionRequest,
    setup: Option<&ToolSetup>,
    style: ToolStyle,
) -> Result<(Value, Option<Value>), ApiError> {
    let template_knows_tools = style != ToolStyle::Unaware;
    let mut out: Vec<Value> = Vec::with_capacity(req.messages.len() + 1);
    for (i, m) in req.messages.iter().enumerate() {
        let calls = m.typed_tool_calls(i)?;
        let mut v = json!({"role": m.role.as_str(), "content": m.text()});
        if let Some(name) = &m.name {
            v["name"] = Value::String(name.clone());
        }
        if template_knows_tools {
            if !calls.is_empty() {
                v["tool_calls"] = Value::Array(calls.iter().map(template_call).collect());
            }
            if let Some(id) = &m.tool_call_id {
                v["tool_call_id"] = Value::String(id.clone());
            }
            out.push(v);
            continue;
        }
        if m.role == Role::Tool {
            let response = format!("<tool_response>\n{}\n</tool_response>", m.text());
            // Consecutive results go into one user turn, as tool-aware templates do.
            match out.last_mut() {
                Some(prev) if prev.get("tool_results") == Some(&Value::Bool(true)) => {
                    let joined = format!("{}\n{response}", prev["content"].as_str().unwrap_or(""));
                    prev["content"] = Value::String(joined);
                }
                _ => out.push(json!({"role": "user", "content": response, "tool_results": true})),
            }
            continue;
        }
        if !calls.is_empty() {
            let mut text = m.text();
            for c in &calls {
                if !text.is_empty() {
                    text.push('\n');
                }
                let call = json!({"name": c.function.name, "arguments": arguments_value(c)});
                text.push_str(&format!(
                    "{CALL_OPEN}\n{}\n{CALL_CLOSE}",
                    spaced_json(&call)
                ));
            }
            v["content"] = Value::String(text);
        }
        out.push(v);
    }
    let tools = match setup {
        Some(s) if template_knows_tools => Some(Value::Array(
            s.offered()
                .map(|t| serde_json::to_value(t).unwrap_or_default())
                .collect(),
        )),
        Some(s) => {
            let text = s.system_text();
            match out.first_mut() {
                Some(first) if matches!(first["role"].as_str(), Some("system" | "developer")) => {
                    let merged = format!("{}\n\n{text}", first["content"].as_str().unwrap_or(""));
                    first["content"] = Value::String(merged);
                }
                _ => out.insert(0, json!({"role": "system", "content": text})),
            }
            None
        }
        None => None,
    };
    Ok((Value::Array(out), tools))
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "`), the layout models were trained on.
fn spaced_json(value: &Value) -> String {
    fn separate<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }
    struct Spaced;
    impl serde_json::ser::Formatter for Spaced {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            separate(writer, first)
        }

        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            separate(writer, first)
        }

        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
        ) -> std::io::Result<()> {
            writer.write_all(b": ")
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, Spaced);
    match serde::Serialize::serialize(value, &mut ser) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => value.to_string(),
    }
}

fn arguments_value(call: &ToolCall) -> Value {
    serde_json::from_str(&call.function.arguments)
        .unwrap_or_else(|_| Value::String(call.function.arguments.clone()))
}

fn template_call(call: &ToolCall) -> Value {
    json!({"id": call.id, "type": "function",
        "function": {"name": call.function.name, "arguments": arguments_value(call)}})
}

/// What the parser hands on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ToolOutput {
    /// Ordinary answer text.
    Text(String),
    /// A complete call.
    Call(ToolCall),
}

/// Splits generated text into answer text and tool calls as it streams in. Text that could be
/// the start of a call is held back until it is known; markup never reaches the client as text,
/// nor does the whitespace that separates calls. A call repeated word for word is dropped.
pub(crate) struct ToolCallParser {
    names: Vec<String>,
    pending: String,
    in_call: bool,
    /// The answer so far is only whitespace (a bare JSON call may still begin).
    at_start: bool,
    /// The answer began with `{`: held whole until the end, then read as a call or as text.
    bare_json: bool,
    /// Trailing whitespace of the text released so far, held until text (not a call) follows.
    held_space: String,
    /// The last output was a call: leading whitespace of the next text is dropped.
    after_call: bool,
    /// (name, arguments) of the calls made, to drop exact repeats.
    seen: Vec<(String, String)>,
}

impl ToolCallParser {
    pub(crate) fn new(setup: &ToolSetup) -> Self {
        Self {
            names: setup
                .tools
                .iter()
                .map(|t| t.function.name.clone())
                .collect(),
            pending: String::new(),
            in_call: false,
            at_start: true,
            bare_json: false,
            held_space: String::new(),
            after_call: false,
            seen: Vec::new(),
        }
    }

    /// Releases answer text, keeping whitespace next to calls out of it.
    fn release_text(&mut self, out: &mut Vec<ToolOutput>, text: &str) {
        let mut text = text;
        if self.after_call {
            text = text.trim_start();
            if text.is_empty() {
                return;
            }
            self.after_call = false;
        }
        let body = text.trim_end();
        if body.is_empty() {
            self.held_space.push_str(text);
            return;
        }
        let mut released = std::mem::take(&mut self.held_space);
        released.push_str(body);
        out.push(ToolOutput::Text(released));
        self.held_space.push_str(&text[body.len()..]);
    }

    /// Releases a call or the text that turned out not to be one.
    fn release(&mut self, out: &mut Vec<ToolOutput>, output: ToolOutput) {
        match output {
            ToolOutput::Text(t) => self.release_text(out, &t),
            ToolOutput::Call(c) => {
                self.held_space.clear();
                self.after_call = true;
                let key = (c.function.name.clone(), c.function.arguments.clone());
                if !self.seen.contains(&key) {
                    self.seen.push(key);
                    out.push(ToolOutput::Call(c));
                }
            }
        }
    }

    /// Adds generated text; returns what can be released now.
    pub(crate) fn push(&mut self, text: &str) -> Vec<ToolOutput> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        if self.at_start {
            let trimmed = self.pending.trim_start();
            if trimmed.is_empty() {
                return out;
            }
            self.at_start = false;
            self.bare_json = trimmed.starts_with('{');
        }
        if self.bare_json {
            return out;
        }
        loop {
            if self.in_call {
                let Some(end) = self.pending.find(CALL_CLOSE) else {
                    return out;
                };
                let body: String = self.pending[..end].to_string();
                self.pending.drain(..end + CALL_CLOSE.len());
                self.in_call = false;
                let output = self.call_or_text(&body, true);
                self.release(&mut out, output);
                continue;
            }
            if let Some(start) = self.pending.find(CALL_OPEN) {
                let before = self.pending[..start].to_string();
                self.release_text(&mut out, &before);
                self.pending.drain(..start + CALL_OPEN.len());
                self.in_call = true;
                continue;
            }
            // Hold back a tail that may be the beginning of `<tool_call>`.
            let keep = (1..CALL_OPEN.len())
                .rev()
                .find(|&k| self.pending.ends_with(&CALL_OPEN[..k]))
                .unwrap_or(0);
            let cut = self.pending.len() - keep;
            let released: String = self.pending.drain(..cut).collect();
            self.release_text(&mut out, &released);
            return out;
        }
    }

    /// Releases everything at the end of generation: an unterminated call is still read as a
    /// call if its JSON is complete, and dropped if not.
    pub(crate) fn finish(&mut self) -> Vec<ToolOutput> {
        let rest = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        if self.in_call {
            // A call cut off mid-way (max_tokens) is dropped rather than shown as markup.
            self.in_call = false;
            if let call @ ToolOutput::Call(_) = self.call_or_text(&rest, true) {
                self.release(&mut out, call);
            }
        } else if self.bare_json {
            let output = self.call_or_text(&rest, false);
            self.release(&mut out, output);
        } else {
            self.release_text(&mut out, &rest);
        }
        // Trailing whitespace is the answer's own only when it called nothing.
        let space = std::mem::take(&mut self.held_space);
        if self.seen.is_empty() && !space.is_empty() {
            out.push(ToolOutput::Text(space));
        }
        out
    }

    /// A call from its JSON body, or the original text when it is not one.
    fn call_or_text(&self, body: &str, tagged: bool) -> ToolOutput {
        let parsed: Option<(String, Value)> = serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| {
                let name = v.get("name")?.as_str()?.to_string();
                let args = v
                    .get("arguments")
                    .or_else(|| v.get("parameters"))
                    .cloned()
                    .unwrap_or_else(|| json!({}));
                Some((name, args))
            })
            .filter(|(name, _)| self.names.contains(name));
        match parsed {
            Some((name, args)) => {
                let args = match args {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                ToolOutput::Call(ToolCall::new(call_id(), name, args))
            }
            None if tagged => ToolOutput::Text(format!("{CALL_OPEN}{body}")),
            None => ToolOutput::Text(body.to_string()),
        }
    }
}

/// A fresh tool-call id, `call_` and 24 hex digits.
fn call_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mix = (t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(23);
    format!("call_{mix:016x}{:08x}", n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lastmile_protocol::ChatMessage;

    fn setup(choice: ToolChoice) -> ToolSetup {
        ToolSetup {
            tools: vec![Tool::function(
                "get_weather",
                Some("Weather in a city".into()),
                json!({"type": "object", "properties": {"city": {"type": "string"}}}),
            )],
            choice,
            parallel: true,
            style: ToolStyle::Unaware,
        }
    }

    fn run(parser: &mut ToolCallParser, pieces: &[&str]) -> Vec<ToolOutput> {
        let mut out = Vec::new();
        for p in pieces {
            out.extend(parser.push(p));
        }
        out.extend(parser.finish());
        out
    }

    fn call_parts(o: &ToolOutput) -> Option<(String, Value)> {
        match o {
            ToolOutput::Call(c) => Some((
                c.function.name.clone(),
                serde_json::from_str(&c.function.arguments).expect("arguments are JSON"),
            )),
            ToolOutput::Text(_) => None,
        }
    }

    #[test]
    fn tagged_calls_split_across_pieces_are_read_and_never_leak() {
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(
            &mut p,
            &[
                "Let me check.\n<tool",
                "_call>\n{\"name\": \"get_weather\", ",
                "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            ],
        );
        assert_eq!(out[0], ToolOutput::Text("Let me check.".into()));
        assert_eq!(
            call_parts(&out[1]),
            Some(("get_weather".into(), json!({"city": "Paris"})))
        );
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn text_that_only_looks_like_markup_is_released() {
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(&mut p, &["a <tool", "box> b"]);
        let text: String = out
            .iter()
            .map(|o| match o {
                ToolOutput::Text(t) => t.as_str(),
                ToolOutput::Call(_) => panic!("no call expected"),
            })
            .collect();
        assert_eq!(text, "a <toolbox> b");
        // An unknown function or broken JSON comes back as the text the model wrote.
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(&mut p, &["<tool_call>{\"name\": \"rm\"}</tool_call>"]);
        assert_eq!(
            out,
            vec![ToolOutput::Text("<tool_call>{\"name\": \"rm\"}".into())]
        );
    }

    #[test]
    fn whitespace_between_calls_and_repeated_calls_are_dropped() {
        let call = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let other = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(&mut p, &["\n", call, "\n", call, "\n", other, "\n "]);
        let cities: Vec<Value> = out
            .iter()
            .map(|o| call_parts(o).expect("only calls").1["city"].clone())
            .collect();
        assert_eq!(cities, vec![json!("Paris"), json!("Rome")]);
        // Text keeps its own spacing; whitespace is only dropped next to calls.
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(&mut p, &["Checking ", " now.  ", "\n", call, "\n\nDone."]);
        let texts: Vec<&str> = out
            .iter()
            .filter_map(|o| match o {
                ToolOutput::Text(t) => Some(t.as_str()),
                ToolOutput::Call(_) => None,
            })
            .collect();
        assert_eq!(texts, vec!["Checking", "  now.", "Done."]);
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(&mut p, &["plain ", "text \n"]);
        let text: String = out
            .iter()
            .map(|o| match o {
                ToolOutput::Text(t) => t.clone(),
                ToolOutput::Call(_) => panic!("no call"),
            })
            .collect();
        assert_eq!(text, "plain text \n", "without calls the text is untouched");
    }

    #[test]
    fn unterminated_and_bare_json_calls() {
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(
            &mut p,
            &["<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}"],
        );
        assert_eq!(call_parts(&out[0]), Some(("get_weather".into(), json!({}))));
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(
            &mut p,
            &[
                "  {\"name\": \"get_weather\", ",
                "\"parameters\": {\"city\": \"Oslo\"}}",
            ],
        );
        assert_eq!(
            call_parts(&out[0]),
            Some(("get_weather".into(), json!({"city": "Oslo"})))
        );
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(&mut p, &["ok <tool_call>\n{\"name\": \"get_wea"]);
        assert_eq!(
            out,
            vec![ToolOutput::Text("ok".into()), ToolOutput::Text(" ".into())]
        );
        let mut p = ToolCallParser::new(&setup(ToolChoice::Auto));
        let out = run(&mut p, &["{not a call"]);
        assert_eq!(out, vec![ToolOutput::Text("{not a call".into())]);
    }

    #[test]
    fn conversation_with_calls_and_results_is_rendered_as_text() {
        let mut req = ChatCompletionRequest::new(
            "m",
            vec![ChatMessage::new(Role::User, "Weather in Paris?")],
        );
        let mut assistant = ChatMessage::new(Role::Assistant, "");
        assistant.content = None;
        assistant.tool_calls = Some(vec![json!({"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}})]);
        req.messages.push(assistant);
        let mut result = ChatMessage::new(Role::Tool, "18 C, sunny");
        result.tool_call_id = Some("call_1".into());
        req.messages.push(result.clone());
        req.messages.push(result);
        let s = setup(ToolChoice::Auto);
        let (msgs, tools) = template_messages(&req, Some(&s), ToolStyle::Unaware).expect("renders");
        assert!(tools.is_none());
        let msgs = msgs.as_array().expect("array").clone();
        assert_eq!(msgs.len(), 4, "{msgs:?}");
        assert_eq!(msgs[0]["role"], "system");
        assert!(msgs[0]["content"]
            .as_str()
            .expect("text")
            .contains("\"get_weather\""));
        assert_eq!(
            msgs[2]["content"],
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
        );
        assert_eq!(msgs[3]["role"], "user");
        assert_eq!(
            msgs[3]["content"],
            "<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n18 C, sunny\n</tool_response>"
        );
        let (msgs, tools) = template_messages(&req, Some(&s), ToolStyle::Tagged).expect("renders");
        assert_eq!(tools.expect("tools")[0]["function"]["name"], "get_weather");
        assert_eq!(
            msgs[1]["tool_calls"][0]["function"]["arguments"]["city"],
            "Paris"
        );
        assert_eq!(msgs[2]["tool_call_id"], "call_1");
    }

    #[test]
    fn forced_grammar_only_for_required_or_named() {
        assert!(setup(ToolChoice::Auto).forced_grammar().is_none());
        let g = setup(ToolChoice::Required)
            .forced_grammar()
            .expect("grammar");
        assert!(g.contains("%json") && g.contains("get_weather") && g.contains("(\"\\n\" call)*"));
    }
}
