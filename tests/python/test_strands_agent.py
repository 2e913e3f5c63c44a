"""A real agent framework end to end: a Strands Agents agent, with its OpenAI model provider pointed
at lastmile, runs its loop with a Python tool — the model calls the tool, Strands runs it and sends
the result back, and the model answers. The small model would not reliably choose the tool on its
own, so the model provider forces a call on the first turn (`tool_choice: required`) and forbids
one once a result is in the conversation; everything else is Strands' own code."""

from strands import Agent, tool
from strands.models.openai import OpenAIModel

import json

from conftest import MODEL, admin_request

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


class ForcedRunCodeModel(OpenAIModel):
    """Forces a `run_code` call after each question and forbids one after its result."""

    def format_request(self, messages, tool_specs=None, system_prompt=None, tool_choice=None, **kwargs):
        request = super().format_request(messages, tool_specs, system_prompt, tool_choice, **kwargs)
        answered = any("toolResult" in block for block in messages[-1]["content"])
        if tool_specs:
            forced = {"type": "function", "function": {"name": "run_code"}}
            request["tool_choice"] = "none" if answered else forced
            request["parallel_tool_calls"] = False
        return request


# One worked example in the conversation (the 10th number): in-context learning is how a 135M
# model writes working code for the 30th. The answer (832040) is in no message before the
# sandbox prints it.
EXAMPLE = [
    {"role": "user", "content": [{"text": "What is the 10th Fibonacci number? Use Python."}]},
    {"role": "assistant", "content": [{"toolUse": {"toolUseId": "example", "name": "run_code", "input": {
        "code": "a, b = 0, 1\nfor _ in range(10):\n    a, b = b, a + b\nprint(a)"}}}]},
    {"role": "user", "content": [{"toolResult": {"toolUseId": "example", "status": "success", "content": [
        {"text": json.dumps({"stdout": "55\n", "stderr": "", "exit_code": 0})}]}}]},
    {"role": "assistant", "content": [{"text": "The 10th Fibonacci number is 55."}]},
]


def test_an_agent_thinks_and_acts_on_lastmile_alone(gateway_with_sandboxes):
    """Strands Agents with both halves on one lastmile server and one key: its OpenAI provider on
    the model API, its MCP client on /mcp. The agent writes Python, runs it in a sandbox through
    the `run_code` tool, and answers with what the sandbox printed."""
    from strands.tools.mcp import MCPClient

    url = gateway_with_sandboxes
    key = admin_request(url, "POST", "/admin/keys", {"name": "strands-mcp"})["key"]
    mcp = MCPClient(url=url + "/mcp", headers={"Authorization": f"Bearer {key}"},
                    tool_filters={"allowed": ["run_code"]})
    with mcp:
        tools = mcp.list_tools_sync()
        assert [t.tool_name for t in tools] == ["run_code"]
        model = ForcedRunCodeModel(client_args={"base_url": url + "/v1", "api_key": key}, model_id=MODEL,
                                   params={"max_tokens": 120, "temperature": 0})
        agent = Agent(model=model, tools=tools, messages=json.loads(json.dumps(EXAMPLE)), callback_handler=None,
                      system_prompt="You are a helpful assistant. Use the run_code tool to run Python code.")
        answer = str(agent("What is the 30th Fibonacci number? Use Python."))

    turn = agent.messages[len(EXAMPLE):]
    assert "832040" not in json.dumps(agent.messages[:len(EXAMPLE) + 1])
    uses = [b["toolUse"] for m in turn for b in m["content"] if "toolUse" in b]
    results = [b["toolResult"] for m in turn for b in m["content"] if "toolResult" in b]
    assert len(uses) == 1 and uses[0]["name"] == "run_code" and "range(30)" in uses[0]["input"]["code"]
    assert results[0]["status"] == "success"
    printed = json.loads(results[0]["content"][0]["text"])
    assert printed["stdout"] == "832040\n" and printed["exit_code"] == 0 and printed["sandbox_id"]
    assert "832040" in answer, answer
