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

#[cfg(test)]
mod tests {
    use super::*;

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
