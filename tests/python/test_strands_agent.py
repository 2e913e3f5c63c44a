"""A real agent framework end to end: a Strands Agents agent, with its OpenAI model provider pointed
at lastmile, runs its loop with a Python tool — the model calls the tool, Strands runs it and sends
the result back, and the model answers. The small model would not reliably choose the tool on its
own, so the model provider forces a call on the first turn (`tool_choice: required`) and forbids
one once a result is in the conversation; everything else is Strands' own code."""

from strands import Agent, tool
from strands.models.openai import OpenAIModel

from conftest import MODEL

CALLS: list[str] = []


@tool
def letter_count(word: str) -> int:
    """Count the letters in a word.

    Args:
        word: The word to count.
    """
    CALLS.append(word)
    return sum(ch.isalpha() for ch in word)


class FirstTurnToolModel(OpenAIModel):
    """Forces a tool call until a tool result is in the conversation, then forbids more calls."""

    def format_request(self, messages, tool_specs=None, system_prompt=None, tool_choice=None, **kwargs):
        request = super().format_request(messages, tool_specs, system_prompt, tool_choice, **kwargs)
        answered = any("toolResult" in block for m in messages for block in m["content"])
        if tool_specs:
            request["tool_choice"] = "none" if answered else "required"
            request["parallel_tool_calls"] = False
        return request


def test_agent_loop_with_a_python_tool(base_url):
    model = FirstTurnToolModel(
        client_args={"base_url": base_url + "/v1", "api_key": "not-needed"},
        model_id=MODEL,
        params={"max_tokens": 128, "temperature": 0},
    )
    agent = Agent(model=model, tools=[letter_count], system_prompt="You are a helpful assistant. Answer in one short sentence.", callback_handler=None)
    result = agent("How many letters are in the word 'serverless'?")
    assert len(CALLS) == 1 and isinstance(CALLS[0], str) and CALLS[0]
    blocks = [b for m in agent.messages for b in m["content"]]
    uses = [b["toolUse"] for b in blocks if "toolUse" in b]
    results = [b["toolResult"] for b in blocks if "toolResult" in b]
    assert len(uses) == 1 and uses[0]["name"] == "letter_count"
    assert results[0]["toolUseId"] == uses[0]["toolUseId"] and results[0]["status"] == "success"
    assert str(result).strip(), "the agent should end with an answer"
    assert agent.messages[-1]["role"] == "assistant"
    usage = result.metrics.accumulated_usage
    assert usage["inputTokens"] > 0 and usage["outputTokens"] > 0
