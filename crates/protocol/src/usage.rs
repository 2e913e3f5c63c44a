//! How a worker tells the gateway what a request used, for metering: a response header on whole
//! answers (`x-lastmile-usage: input_tokens=31; output_tokens=16`) and a final SSE comment on
//! streams (`: usage input_tokens=31; output_tokens=16`). SSE comments are ignored by every
//! client, so streams stay exactly what OpenAI and Anthropic clients expect.

/// The response header carrying a whole answer's usage.
pub const USAGE_HEADER: &str = "x-lastmile-usage";

/// Tokens one request used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
}

impl TokenUsage {
    /// `input_tokens=N; output_tokens=M` (the header value).
    pub fn to_header(&self) -> String {
        format!(
            "input_tokens={}; output_tokens={}",
            self.input_tokens, self.output_tokens
        )
    }

    /// The SSE comment that ends a stream.
    pub fn to_sse_comment(&self) -> String {
        format!(": usage {}\n\n", self.to_header())
    }

    /// The SSE comment that opens a metered stream: its prompt tokens.
    pub fn prompt_comment(input_tokens: u64) -> String {
        format!(": prompt input_tokens={input_tokens}\n\n")
    }

    /// Parses a header value.
    pub fn from_header(value: &str) -> Option<Self> {
        let mut usage = Self::default();
        let (mut input, mut output) = (false, false);
        for part in value.split(';') {
            let (k, v) = part.trim().split_once('=')?;
            let v: u64 = v.trim().parse().ok()?;
            match k.trim() {
                "input_tokens" => (usage.input_tokens, input) = (v, true),
                "output_tokens" => (usage.output_tokens, output) = (v, true),
                _ => {}
            }
        }
        (input && output).then_some(usage)
    }

    /// Finds the usage comment in a piece of an event stream (complete lines only: a line cut
    /// at a chunk boundary is read once the rest has arrived).
    pub fn find_in_stream(text: &str) -> Option<Self> {
        text.split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(": usage "))
            .and_then(Self::from_header)
    }
}

/// Reads a relayed event stream line by line: the final usage comment, the prompt comment, and
/// how many generated pieces went through.
#[derive(Debug, Default, Clone)]
pub struct StreamMeter {
    /// The part of a line not yet ended by a newline.
    partial: Vec<u8>,
    /// The final usage comment, once seen.
    pub usage: Option<TokenUsage>,
    /// The prompt tokens from the opening comment, once seen.
    pub prompt_tokens: Option<u64>,
    /// Generated tokens relayed: one per piece of content (or per log-probability entry, which
    /// is exact), over all choices.
    pub output_tokens: u64,
}

/// Longest line the meter reads (longer lines are relayed but not parsed: a piece of generated
/// text is never this long).
const MAX_METERED_LINE: usize = 1 << 20;

impl StreamMeter {
    /// Reads the next chunk of the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            if self.partial.len() + i <= MAX_METERED_LINE {
                self.partial.extend_from_slice(&rest[..i]);
                let line = std::mem::take(&mut self.partial);
                self.line(&String::from_utf8_lossy(&line));
            }
            self.partial.clear();
            rest = &rest[i + 1..];
        }
        if self.partial.len() + rest.len() <= MAX_METERED_LINE {
            self.partial.extend_from_slice(rest);
        }
    }

    /// What the stream used so far: its final report, or (cut short) the prompt once a token
    /// came and the output relayed.
    pub fn used(&self) -> TokenUsage {
        self.usage.unwrap_or(TokenUsage {
            input_tokens: if self.output_tokens > 0 {
                self.prompt_tokens.unwrap_or(0)
            } else {
                0
            },
            output_tokens: self.output_tokens,
        })
    }

    fn line(&mut self, line: &str) {
        let line = line.trim_end_matches('\r');
        if let Some(report) = line.strip_prefix(": usage ") {
            self.usage = self.usage.or(TokenUsage::from_header(report));
        } else if let Some(n) = line.strip_prefix(": prompt input_tokens=") {
            self.prompt_tokens = n.trim().parse().ok();
        } else if let Some(data) = line.strip_prefix("data:") {
            self.output_tokens += generated_in(data.trim());
        }
    }
}

/// Generated tokens in one event's data (OpenAI chat or completion chunk, Anthropic event).
fn generated_in(data: &str) -> u64 {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(data) else {
        return 0;
    };
    if v["type"] == "content_block_delta" {
        return 1;
    }
    let nonempty = |v: &serde_json::Value| v.as_str().is_some_and(|s| !s.is_empty());
    let Some(choices) = v["choices"].as_array() else {
        return 0;
    };
    choices
        .iter()
        .map(|c| {
            let listed = c["logprobs"]["content"]
                .as_array()
                .or(c["logprobs"]["tokens"].as_array())
                .map_or(0, |l| l.len() as u64);
            let delta = &c["delta"];
            let calls = delta["tool_calls"].as_array().is_some_and(|calls| {
                calls
                    .iter()
                    .any(|call| nonempty(&call["function"]["arguments"]))
            });
            let piece = nonempty(&delta["content"]) || nonempty(&c["text"]) || calls;
            if listed > 0 {
                listed
            } else {
                u64::from(piece)
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_stream_is_charged_its_prompt_and_the_pieces_relayed() {
        let mut m = StreamMeter::default();
        let role = r#"data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        m.push(format!("{role}\n\n{}", TokenUsage::prompt_comment(31)).as_bytes());
        assert_eq!(
            m.used(),
            TokenUsage::default(),
            "no token yet: nothing computed"
        );
        let piece = r#"data: {"choices":[{"index":0,"delta":{"content":"Hi"}},{"index":1,"delta":{"content":"Yo"}}]}"#;
        // A line split across chunks is read once.
        let (a, b) = piece.split_at(20);
        m.push(a.as_bytes());
        m.push(format!("{b}\n\n").as_bytes());
        let text =
            r#"data: {"choices":[{"index":0,"text":" there","logprobs":{"tokens":["a","b"]}}]}"#;
        m.push(format!("{text}\n\n").as_bytes());
        let anthropic = r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}}"#;
        m.push(format!("event: content_block_delta\n{anthropic}\n\n").as_bytes());
        assert_eq!(
            m.used(),
            TokenUsage {
                input_tokens: 31,
                output_tokens: 5
            }
        );
        // The final report wins.
        let report = TokenUsage {
            input_tokens: 31,
            output_tokens: 9,
        };
        m.push(report.to_sse_comment().as_bytes());
        assert_eq!(m.used(), report);
    }

    #[test]
    fn header_and_comment_round_trip() {
        let u = TokenUsage {
            input_tokens: 31,
            output_tokens: 16,
        };
        assert_eq!(u.to_header(), "input_tokens=31; output_tokens=16");
        assert_eq!(TokenUsage::from_header(&u.to_header()), Some(u));
        let stream = format!("data: {{}}\n\n{}data: [DONE]\n\n", u.to_sse_comment());
        assert_eq!(TokenUsage::find_in_stream(&stream), Some(u));
        // Regression: a comment cut at a chunk boundary ("output_tokens=1|6") is not read short.
        assert_eq!(
            TokenUsage::find_in_stream(": usage input_tokens=31; output_tokens=1"),
            None
        );
        // Comments are not data: clients see none of it.
        assert_eq!(crate::parse_sse_data(&stream), ["{}", "[DONE]"]);
        assert_eq!(TokenUsage::from_header("input_tokens=3"), None);
        assert_eq!(
            TokenUsage::from_header("input_tokens=x; output_tokens=1"),
            None
        );
    }
}
