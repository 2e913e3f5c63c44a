//! Streaming `POST /v1/messages`: Anthropic's named server-sent events, produced by the
//! [`MessageStream`] state machine and framed by [`frame_event`].
//!
//! A stream is `message_start`, then per content block `content_block_start`,
//! `content_block_delta`s and `content_block_stop`, then `message_delta` and `message_stop`;
//! `ping` may appear anywhere. Invariants kept by [`MessageStream`]: `message_start` comes first
//! and exactly once, at most one block is open, block indexes count up from 0 by one, every
//! opened block is stopped, and nothing follows `message_stop`.

use serde_json::{json, Value};

use super::response::StopReason;
use crate::sampling::FinishReason;

/// One event: its name (the SSE `event:` field) and its JSON payload (the `data:` field).
pub type MessageEvent = (&'static str, Value);

/// Frames an event as `event: NAME\ndata: {compact json}\n\n`.
pub fn frame_event(event: &MessageEvent) -> String {
    let (name, data) = event;
    format!("event: {name}\ndata: {data}\n\n")
}

/// Frames several events, in order, as one string.
pub fn frame_events(events: &[MessageEvent]) -> String {
    events.iter().map(frame_event).collect()
}

/// Builds the event sequence of one streamed message from the pieces the pipeline produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageStream {
    id: String,
    model: String,
    input_tokens: u32,
    started: bool,
    /// Index of the open text block, if one is open.
    open_text: Option<u32>,
    next_index: u32,
    finished: bool,
}

impl MessageStream {
    /// A stream for message `id` (`msg_...`) of `model`, whose prompt took `input_tokens`.
    pub fn new(id: impl Into<String>, model: impl Into<String>, input_tokens: u32) -> Self {
        Self {
            id: id.into(),
            model: model.into(),
            input_tokens,
            started: false,
            open_text: None,
            next_index: 0,
            finished: false,
        }
    }

    /// A keep-alive `ping` event.
    pub fn ping() -> MessageEvent {
        ("ping", json!({"type": "ping"}))
    }

    /// Whether `message_stop` has been produced.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// `message_start`, the first time only (the other methods send it when it is still due).
    pub fn start(&mut self) -> Vec<MessageEvent> {
        let mut events = Vec::new();
        self.push_start(&mut events);
        events
    }

    /// A piece of text: opens a text block when none is open, then one `text_delta`.
    /// Empty text, and anything after [`Self::finish`], produces nothing.
    pub fn text(&mut self, text: &str) -> Vec<MessageEvent> {
        let mut events = Vec::new();
        if self.finished || text.is_empty() {
            return events;
        }
        self.push_start(&mut events);
        let index = match self.open_text {
            Some(index) => index,
            None => {
                let index = self.open_block(&mut events, json!({"type": "text", "text": ""}));
                self.open_text = Some(index);
                index
            }
        };
        events.push(block_delta(
            index,
            json!({"type": "text_delta", "text": text}),
        ));
        events
    }

    /// A whole tool call: closes an open text block, then a `tool_use` block with the arguments
    /// (a JSON text) as one `input_json_delta`. Nothing after [`Self::finish`].
    pub fn tool_call(&mut self, id: &str, name: &str, arguments: &str) -> Vec<MessageEvent> {
        let mut events = Vec::new();
        if self.finished {
            return events;
        }
        self.push_start(&mut events);
        self.close_text(&mut events);
        let block = json!({"type": "tool_use", "id": id, "name": name, "input": {}});
        let index = self.open_block(&mut events, block);
        let delta = json!({"type": "input_json_delta", "partial_json": arguments});
        events.push(block_delta(index, delta));
        events.push(block_stop(index));
        events
    }

    /// The end: closes an open block, then `message_delta` (stop reason, the stop sequence when
    /// one ended generation, and the total `output_tokens`) and `message_stop`. Only once.
    pub fn finish(
        &mut self,
        reason: FinishReason,
        output_tokens: u32,
        stop_sequence: Option<&str>,
    ) -> Vec<MessageEvent> {
        let mut events = Vec::new();
        if self.finished {
            return events;
        }
        self.push_start(&mut events);
        self.close_text(&mut events);
        let stop_reason = StopReason::from_finish(reason, stop_sequence);
        let stop_sequence = stop_sequence.filter(|_| stop_reason == StopReason::StopSequence);
        events.push((
            "message_delta",
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": output_tokens},
            }),
        ));
        events.push(("message_stop", json!({"type": "message_stop"})));
        self.finished = true;
        events
    }

    fn push_start(&mut self, events: &mut Vec<MessageEvent>) {
        if self.started {
            return;
        }
        self.started = true;
        let message = json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        });
        events.push((
            "message_start",
            json!({"type": "message_start", "message": message}),
        ));
    }

    /// Opens a block with the next index and returns that index.
    fn open_block(&mut self, events: &mut Vec<MessageEvent>, content_block: Value) -> u32 {
        let index = self.next_index;
        self.next_index += 1;
        events.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": content_block}),
        ));
        index
    }

    fn close_text(&mut self, events: &mut Vec<MessageEvent>) {
        if let Some(index) = self.open_text.take() {
            events.push(block_stop(index));
        }
    }
}

fn block_delta(index: u32, delta: Value) -> MessageEvent {
    (
        "content_block_delta",
        json!({"type": "content_block_delta", "index": index, "delta": delta}),
    )
}

fn block_stop(index: u32) -> MessageEvent {
    (
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anthropic::MessagesResponse;
    use crate::sse::parse_sse_data;

    fn names(events: &[MessageEvent]) -> Vec<&'static str> {
        events.iter().map(|e| e.0).collect()
    }

    #[test]
    fn text_only_stream_is_anthropics_exact_sequence() {
        let mut s = MessageStream::new("msg_1", "claude-x", 10);
        let mut events = s.start();
        events.push(MessageStream::ping());
        events.extend(s.text("Hel"));
        events.extend(s.text(""));
        events.extend(s.text("lo"));
        events.extend(s.finish(FinishReason::Stop, 2, None));
        assert!(s.is_finished());
        let data: Vec<Value> = events.iter().map(|e| e.1.clone()).collect();
        assert_eq!(
            data,
            vec![
                json!({"type": "message_start", "message": {
                    "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 10, "output_tokens": 0}}}),
                json!({"type": "ping"}),
                json!({"type": "content_block_start", "index": 0,
                       "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": "Hel"}}),
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": "lo"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "message_delta",
                       "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                       "usage": {"output_tokens": 2}}),
                json!({"type": "message_stop"}),
            ]
        );
        // Every event's name is its payload's `type`.
        for (name, data) in &events {
            assert_eq!(data["type"], json!(name));
        }
        let start: MessagesResponse =
            serde_json::from_value(data[0]["message"].clone()).expect("a message");
        assert_eq!(start.stop_reason, None);
    }

    #[test]
    fn text_then_tool_use_stream() {
        let mut s = MessageStream::new("msg_2", "m", 5);
        let mut events = s.text("Checking.");
        events.extend(s.tool_call("call_1", "get_weather", r#"{"city":"Paris"}"#));
        events.extend(s.tool_call("call_2", "get_time", "{}"));
        events.extend(s.finish(FinishReason::ToolCalls, 30, None));
        assert_eq!(
            names(&events),
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            events[4].1,
            json!({"type": "content_block_start", "index": 1, "content_block":
                   {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}})
        );
        assert_eq!(
            events[5].1,
            json!({"type": "content_block_delta", "index": 1, "delta":
                   {"type": "input_json_delta", "partial_json": "{\"city\":\"Paris\"}"}})
        );
        assert_eq!(events[3].1["index"], json!(0));
        assert_eq!(events[9].1["index"], json!(2));
        assert_eq!(events[10].1["delta"]["stop_reason"], json!("tool_use"));
        assert_eq!(events[10].1["usage"], json!({"output_tokens": 30}));
    }

    #[test]
    fn text_after_a_tool_call_opens_a_new_block() {
        let mut s = MessageStream::new("msg_3", "m", 1);
        let mut events = s.tool_call("c", "f", "{}");
        events.extend(s.text("done"));
        events.extend(s.finish(FinishReason::Stop, 3, Some("END")));
        let starts: Vec<&Value> = events
            .iter()
            .filter(|e| e.0 == "content_block_start")
            .map(|e| &e.1["index"])
            .collect();
        assert_eq!(starts, [&json!(0), &json!(1)]);
        let delta = &events[events.len() - 2].1;
        assert_eq!(
            delta["delta"],
            json!({"stop_reason": "stop_sequence", "stop_sequence": "END"})
        );
    }

    #[test]
    fn empty_answer_and_nothing_after_finish() {
        let mut s = MessageStream::new("msg_4", "m", 1);
        let events = s.finish(FinishReason::Length, 0, None);
        assert_eq!(
            names(&events),
            ["message_start", "message_delta", "message_stop"]
        );
        assert_eq!(events[1].1["delta"]["stop_reason"], json!("max_tokens"));
        assert!(s.text("late").is_empty());
        assert!(s.tool_call("c", "f", "{}").is_empty());
        assert!(s.finish(FinishReason::Stop, 1, None).is_empty());
        assert!(s.start().is_empty());
    }

    #[test]
    fn framing_is_named_sse() {
        let mut s = MessageStream::new("msg_5", "m", 1);
        let events = s.text("a\nb");
        let framed = frame_event(&events[2]);
        let data = framed
            .strip_prefix("event: content_block_delta\ndata: ")
            .and_then(|rest| rest.strip_suffix("\n\n"))
            .expect("named event framing");
        assert!(!data.contains('\n'), "one data line: {data:?}");
        assert_eq!(
            serde_json::from_str::<Value>(data).expect("json"),
            events[2].1
        );
        let body = frame_events(&events);
        assert!(body.starts_with("event: message_start\ndata: {"));
        let payloads = parse_sse_data(&body);
        assert_eq!(payloads.len(), 3);
        for (payload, (_, data)) in payloads.iter().zip(&events) {
            let parsed: Value = serde_json::from_str(payload).expect("json");
            assert_eq!(&parsed, data);
        }
    }
}
