"""The official `anthropic` package drives lastmile's Messages API unchanged: messages with a system
prompt and several turns, stop sequences, streaming events, tool use with a full round trip,
count_tokens, and errors raised as the SDK's own exception types."""

import anthropic
from pydantic import BaseModel
import pytest

from conftest import MODEL

WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
        "required": ["city", "unit"],
    },
}


@pytest.fixture(scope="module")
def claude(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="not-needed", max_retries=0)


def test_message_with_system_and_turns(claude):
    r = claude.messages.create(
        model=MODEL,
        max_tokens=24,
        system="You are a terse assistant.",
        messages=[
            {"role": "user", "content": "Hi, I am Ada."},
            {"role": "assistant", "content": "Hello Ada."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
        ],
        extra_body={"temperature": 0},
    )
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.model == MODEL
    assert r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens")
    assert r.usage.input_tokens > 20 and 0 < r.usage.output_tokens <= 24


def test_stop_sequence_is_reported(claude):
    r = claude.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        stop_sequences=["5"],
        extra_body={"temperature": 0},
    )
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "5", r
    assert "5" not in r.content[0].text


def test_streaming_matches_whole(claude):
    kw = dict(
        model=MODEL,
        max_tokens=20,
        messages=[{"role": "user", "content": "Name three colours."}],
        extra_body={"temperature": 0},
    )
    whole = claude.messages.create(**kw)
    with claude.messages.stream(**kw) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text
    assert final.content[0].text == text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    events = [e.type for e in claude.messages.create(stream=True, **kw)]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    # (The SDK swallows the ping that follows message_start.)
    assert events[1] == "content_block_start" and "content_block_delta" in events
    assert events[-3:-1] == ["content_block_stop", "message_delta"]


def test_tool_use_round_trip(claude):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = claude.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=[question],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        extra_body={"temperature": 0},
    )
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather"
    assert isinstance(uses[0].input["city"], str) and uses[0].input["unit"] in ("C", "F")
    second = claude.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=[
            question,
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees, sunny"}],
            },
        ],
        tools=[WEATHER],
        tool_choice={"type": "none"},
        extra_body={"temperature": 0},
    )
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert second.content[0].type == "text" and second.content[0].text


def test_streamed_tool_use(claude):
    with claude.messages.stream(
        model=MODEL,
        max_tokens=64,
        messages=[{"role": "user", "content": "Weather in Oslo, in F?"}],
        tools=[WEATHER],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body={"temperature": 0},
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city", "unit"}


def test_count_tokens(claude):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    counted = claude.messages.count_tokens(model=MODEL, messages=msgs, system="Be brief.")
    r = claude.messages.create(model=MODEL, max_tokens=1, messages=msgs, system="Be brief.")
    assert counted.input_tokens == r.usage.input_tokens
    with_tools = claude.messages.count_tokens(model=MODEL, messages=msgs, system="Be brief.", tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens


def test_errors_are_sdk_exceptions(claude):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "nope"},
        )


class City(BaseModel):
    name: str
    population: int
    capital: bool


def test_structured_output_with_parse(claude):
    r = claude.messages.parse(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "Describe a large city as JSON."}],
        output_format=City,
        extra_body={"temperature": 0},
    )
    assert r.stop_reason == "end_turn", r
    assert isinstance(r.parsed_output, City)
    assert City.model_validate_json(r.content[0].text) == r.parsed_output
