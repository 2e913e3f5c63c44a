//! Chat templates: the Jinja program shipped with a model (`tokenizer.chat_template`) rendered
//! with minijinja and Python-compatible string/list/dict methods, as Hugging Face renders it.

use minijinja::{Environment, ErrorKind, Value};

use crate::error::{EngineError, Result};

/// ChatML, used when a model ships no template.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: String,
    eos: String,
    tool_style: ToolStyle,
}

/// How a chat template deals with tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolStyle {
    /// The template ignores tools; the server writes them into the conversation as text.
    Unaware,
    /// The template renders tools, and calls are `<tool_call>{json}</tool_call>` (Qwen, Hermes).
    Tagged,
    /// The template renders tools, and a call is a bare JSON object (Llama 3).
    BareJson,
}

/// Template instructions one render may run: a conversation of thousands of turns with tools
/// needs well under a million.
const RENDER_FUEL: u64 = 20_000_000;

/// How long a template may take to render a short conversation when a model is loaded.
const VET_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

impl ChatTemplate {
    /// Renders a short conversation with a tool call under a deadline, on a thread of its own:
    /// a template that cannot (a repetition bomb such as `{{ () * 10**12 }}`, which no step
    /// limit sees) is refused when the model is loaded, not met by every request. Errors the
    /// template raises for this conversation's shape are not its business.
    pub fn vet(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<()> {
        let (source, bos, eos) = (
            source.to_string(),
            bos.map(str::to_string),
            eos.map(str::to_string),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("lastmile-template-vet".into())
            .spawn(move || {
                if let Ok(t) = ChatTemplate::new(&source, bos.as_deref(), eos.as_deref()) {
                    let messages = serde_json::json!([
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1",
                            "type": "function", "function": {"name": "weather",
                            "arguments": "{\"city\": \"Paris\"}"}}]},
                        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
                        {"role": "user", "content": "Thanks."},
                    ]);
                    let tools = serde_json::json!([{"type": "function", "function": {
                        "name": "weather", "parameters": {"type": "object"}}}]);
                    let _ = t.render_with_tools(&messages, Some(&tools), true);
                    let _ = t.render(&messages, false);
                }
                let _ = tx.send(());
            })
            .map_err(|e| EngineError::ChatTemplate(format!("vetting the template: {e}")))?;
        rx.recv_timeout(VET_DEADLINE).map_err(|_| {
            EngineError::ChatTemplate(format!(
                "the model's chat template did not render a five-message conversation within \
                 {} s: refusing it (give the model a sane template)",
                VET_DEADLINE.as_secs()
            ))
        })
    }

    /// Compiles `source`; `bos`/`eos` are exposed to it as `bos_token`/`eos_token`.
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        // A model file's template is hostile: every render gets a bounded number of steps.
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| EngineError::ChatTemplate(format!("parsing the template: {e}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos: bos.unwrap_or_default().to_string(),
            eos: eos.unwrap_or_default().to_string(),
            tool_style: if !(source.contains("tools") && source.contains("tool_call")) {
                ToolStyle::Unaware
            } else if source.contains("<tool_call>") {
                ToolStyle::Tagged
            } else {
                ToolStyle::BareJson
            },
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether and how the template renders tool definitions, calls and results.
    pub fn tool_style(&self) -> ToolStyle {
        self.tool_style
    }

    /// Renders `messages` (a JSON array of `{role, content, ...}`), optionally opening the
    /// assistant's turn.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders `messages` with `tools` (OpenAI tool definitions) exposed to the template.
    pub fn render_with_tools(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
            tools => tools.map_or(Value::from(()), Value::from_serialize),
        })
        .map_err(|e| EngineError::ChatTemplate(format!("rendering: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let out = t
            .render(
                &serde_json::json!([{"role": "user", "content": "hi"}]),
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn tool_style_is_read_from_the_source() {
        let style = |src: &str| ChatTemplate::new(src, None, None).unwrap().tool_style();
        assert_eq!(style(CHATML), ToolStyle::Unaware);
        assert_eq!(
            style("{% if tools %}{% for m in messages %}{{ m.tool_calls }}<tool_call>{% endfor %}{% endif %}"),
            ToolStyle::Tagged
        );
        assert_eq!(
            style("{% if tools %}{% for m in messages %}{{ m.tool_calls }}{% endfor %}{% endif %}"),
            ToolStyle::BareJson
        );
    }

    #[test]
    fn templates_that_never_finish_are_refused() {
        // Found by the chat_template fuzzer: repeating an empty sequence spins without a step.
        let bomb = "{{ () * 1000000000000 }}";
        let t = std::time::Instant::now();
        let err = ChatTemplate::vet(bomb, None, None).unwrap_err();
        assert!(err.to_string().contains("did not render"), "{err}");
        assert!(t.elapsed() < VET_DEADLINE + std::time::Duration::from_secs(2));
        // A loop bomb runs out of fuel at once instead (an error, per render).
        let loops =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(loops, None, None).unwrap();
        let err = t.render(&serde_json::json!([]), false).unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
        ChatTemplate::vet(CHATML, None, None).expect("a sane template passes");
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        let ok = t
            .render(
                &serde_json::json!([{"role": "user", "content": "  hi "}]),
                false,
            )
            .unwrap();
        assert_eq!(ok, "HI");
        let err = t
            .render(
                &serde_json::json!([{"role": "system", "content": "x"}]),
                false,
            )
            .unwrap_err();
        assert!(err.to_string().contains("first must be user"));
    }
}
