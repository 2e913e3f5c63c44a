"""Disaggregated prefill and decode with real processes: a `--role prefill` worker computes long
prompts, a `--role decode` worker pulls their KV blocks and generates, behind a kv_aware gateway.
Answers are the same as a single worker's (greedy and seeded sampling, streaming or not, `n`,
logprobs, tool calls, structured output, the Anthropic API); short prompts stay on the decode worker; a corrupted transfer is
noticed and recomputed; a dead prefill worker costs no request; held blocks return to zero; and
internal endpoints refuse callers without the token."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from openai import OpenAI

from conftest import MODEL, metric, start_lastmile, start_server, stop_server, wait_until

TOKEN = "disagg-test-token-5b1e0c9a"


def long_messages(salt, sentences=70):
    """A chat whose prompt is several hundred tokens, distinct per salt."""
    doc = " ".join(f"Fact {salt}-{i}: the {['red', 'blue', 'green'][i % 3]} crate holds {i * 7 + salt} apples." for i in range(sentences))
    return [
        {"role": "system", "content": "You answer from the document. " + doc},
        {"role": "user", "content": f"What does the crate {salt} hold? Answer in one sentence."},
    ]


def serve_role(role, *extra):
    return start_server("--threads", "1", "--role", role, "--internal-token", TOKEN, *extra)


def start_gateway(*workers):
    args = ["--policy", "kv_aware", "--internal-token", TOKEN, "--disagg-min-tokens", "64", "--debug-headers", "--health-interval-ms", "100"]
    for w in workers:
        args += ["--worker", w]
    url, proc = start_lastmile("gateway", *args)
    wait_until(lambda: metric(url, "lastmile_gateway_worker_available", f'worker="{workers[0]}"') == 1
               and all(metric(url, "lastmile_gateway_worker_available", f'worker="{w}"') == 1 for w in workers),
               "every worker available at the gateway")
    return url, proc


@pytest.fixture(scope="module")
def cluster():
    procs = []
    try:
        prefill, p = serve_role("prefill")
        procs.append(p)
        decode, p = serve_role("decode")
        procs.append(p)
        single, p = start_server("--threads", "1")
        procs.append(p)
        gateway, p = start_gateway(prefill, decode)
        procs.append(p)
        yield {"prefill": prefill, "decode": decode, "single": single, "gateway": gateway, "procs": procs}
    finally:
        for p in procs:
            if p.poll() is None:
                stop_server(p)


def sdk(url):
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_a_disaggregated_answer_is_the_single_workers_answer(cluster):
    g, single = sdk(cluster["gateway"]), sdk(cluster["single"])
    remote0 = metric(cluster["gateway"], "lastmile_gateway_disagg_remote_total")
    imported0 = metric(cluster["decode"], "lastmile_kv_blocks_imported_total")
    # Greedy, whole answer.
    messages = long_messages(1)
    raw = g.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert raw.headers["x-lastmile-worker"] == cluster["decode"], "the prefill worker takes no requests"
    ours = raw.parse()
    theirs = single.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens > 300
    assert metric(cluster["gateway"], "lastmile_gateway_disagg_remote_total") == remote0 + 1
    imported = metric(cluster["decode"], "lastmile_kv_blocks_imported_total") - imported0
    assert imported >= ours.usage.prompt_tokens // 16 - 1, imported
    # Streamed, with logprobs.
    messages = long_messages(2)
    chunks = g.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True, logprobs=True, top_logprobs=2)
    text, lps = "", []
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            text += c.choices[0].delta.content
        if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content:
            lps += [(t.token, round(t.logprob, 3)) for t in c.choices[0].logprobs.content]
    ref = single.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
    assert text == ref.choices[0].message.content
    assert lps == [(t.token, round(t.logprob, 3)) for t in ref.choices[0].logprobs.content]
    # Seeded sampling with n = 2.
    messages = long_messages(3)
    kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0.9, seed=11, n=2)
    ours = [c.message.content for c in g.chat.completions.create(**kw).choices]
    theirs = [c.message.content for c in single.chat.completions.create(**kw).choices]
    assert ours == theirs
    assert metric(cluster["gateway"], "lastmile_gateway_disagg_remote_total") == remote0 + 3
    assert metric(cluster["decode"], "lastmile_kv_pulls_total") >= 3
    for reason in ["unreachable", "refused", "checksum", "truncated", "import"]:
        assert metric(cluster["decode"], "lastmile_kv_pull_failures_total", f'reason="{reason}"') == 0, reason
    # Every lease was released: nothing stays held on the prefill worker.
    wait_until(lambda: metric(cluster["prefill"], "lastmile_kv_blocks_held") == 0
               and metric(cluster["prefill"], "lastmile_kv_leases") == 0, "held blocks to return to zero")
    assert metric(cluster["prefill"], "lastmile_kv_prefills_total") >= 3


def test_the_anthropic_api_is_disaggregated_the_same(cluster):
    from anthropic import Anthropic

    messages = long_messages(4)
    system, turns = messages[0]["content"], messages[1:]
    kw = dict(model=MODEL, system=system, messages=turns, max_tokens=16, extra_body={"temperature": 0})
    ours = Anthropic(base_url=cluster["gateway"], api_key="unused", max_retries=0).messages.create(**kw)
    theirs = Anthropic(base_url=cluster["single"], api_key="unused", max_retries=0).messages.create(**kw)
    assert ours.content[0].text == theirs.content[0].text
    assert ours.usage.input_tokens == theirs.usage.input_tokens


def test_tools_and_structured_output_are_disaggregated_the_same(cluster):
    g, single = sdk(cluster["gateway"]), sdk(cluster["single"])
    remote0 = metric(cluster["gateway"], "lastmile_gateway_disagg_remote_total")
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    kw = dict(model=MODEL, messages=long_messages(8), tools=[weather], tool_choice="required",
              parallel_tool_calls=False, max_tokens=48, temperature=0)
    ours, theirs = g.chat.completions.create(**kw).choices[0], single.chat.completions.create(**kw).choices[0]
    assert ours.finish_reason == theirs.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in ours.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in theirs.message.tool_calls]
    schema = {"type": "object", "properties": {"apples": {"type": "integer"}}, "required": ["apples"],
              "additionalProperties": False}
    kw = dict(model=MODEL, messages=long_messages(9), max_tokens=32, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}})
    ours, theirs = g.chat.completions.create(**kw), single.chat.completions.create(**kw)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert isinstance(json.loads(ours.choices[0].message.content)["apples"], int)
    assert metric(cluster["gateway"], "lastmile_gateway_disagg_remote_total") == remote0 + 2


def test_short_prompts_are_computed_where_they_decode(cluster):
    local0 = metric(cluster["gateway"], "lastmile_gateway_disagg_local_total", 'reason="short_prompt"')
    remote0 = metric(cluster["gateway"], "lastmile_gateway_disagg_remote_total")
    msgs = [{"role": "user", "content": "Say hi."}]
    ours = sdk(cluster["gateway"]).chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    theirs = sdk(cluster["single"]).chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert metric(cluster["gateway"], "lastmile_gateway_disagg_local_total", 'reason="short_prompt"') == local0 + 1
    assert metric(cluster["gateway"], "lastmile_gateway_disagg_remote_total") == remote0


def test_internal_endpoints_refuse_callers_without_the_token(cluster):
    prefill, decode = cluster["prefill"], cluster["decode"]
    for method, path, body in [("POST", "/internal/prefill", b'{"tokens":[1,2,3]}'), ("GET", "/internal/kv/00", None), ("DELETE", "/internal/kv/00", None)]:
        for token in [None, "wrong-token"]:
            headers = {"content-type": "application/json"}
            if token:
                headers["x-lastmile-internal-token"] = token
            req = urllib.request.Request(prefill + path, method=method, data=body, headers=headers)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 403, (method, path, token)
    # A KV source named by a client (no token) is ignored: the decode worker computes the prompt
    # and never contacts the named address.
    ignored0 = metric(decode, "lastmile_kv_sources_ignored_total")
    pulls0 = metric(decode, "lastmile_kv_pulls_total")
    raw = OpenAI(base_url=decode + "/v1", api_key="unused", max_retries=0, default_headers={"x-lastmile-kv-source": "http://127.0.0.1:9/internal/kv/ab"})
    out = raw.chat.completions.create(model=MODEL, messages=long_messages(5), max_tokens=4, temperature=0)
    assert out.choices[0].message.content
    assert metric(decode, "lastmile_kv_sources_ignored_total") == ignored0 + 1
    assert metric(decode, "lastmile_kv_pulls_total") == pulls0


def test_a_corrupted_transfer_is_recomputed_not_served(cluster):
    bad_prefill, proc = serve_role("prefill", "--test-corrupt-kv", "--kv-lease-ms", "1500")
    gw, gw_proc = start_gateway(bad_prefill, cluster["decode"])
    try:
        decode = cluster["decode"]
        failed0 = metric(decode, "lastmile_kv_pull_failures_total", 'reason="checksum"')
        imported0 = metric(decode, "lastmile_kv_blocks_imported_total")
        messages = long_messages(6)
        ours = sdk(gw).chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        theirs = sdk(cluster["single"]).chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        assert ours.choices[0].message.content == theirs.choices[0].message.content
        assert metric(decode, "lastmile_kv_pull_failures_total", 'reason="checksum"') == failed0 + 1
        assert metric(decode, "lastmile_kv_blocks_imported_total") == imported0, "no corrupt block was stored"
        wait_until(lambda: metric(bad_prefill, "lastmile_kv_blocks_held") == 0, "the lease to be released")
        # A lease nobody reads or releases (its decode worker died) expires on its own.
        req = urllib.request.Request(
            bad_prefill + "/internal/prefill",
            data=json.dumps({"tokens": list(range(100, 260))}).encode(),
            headers={"content-type": "application/json", "x-lastmile-internal-token": TOKEN},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            reply = json.loads(r.read())
        assert reply["blocks"] == 10 and reply["expires_in_ms"] == 1500, reply
        assert metric(bad_prefill, "lastmile_kv_blocks_held") == 10
        wait_until(lambda: metric(bad_prefill, "lastmile_kv_blocks_held") == 0, "the lease to expire", timeout=10)
        assert metric(bad_prefill, "lastmile_kv_leases") == 0
    finally:
        stop_server(gw_proc)
        stop_server(proc)


def test_a_prefill_worker_killed_under_load_costs_no_request(cluster):
    """Runs last in the module: it kills the cluster's prefill worker."""
    g = sdk(cluster["gateway"])
    salts = list(range(20, 26))
    answers, errors = {}, []

    def ask(salt):
        try:
            out = g.chat.completions.create(model=MODEL, messages=long_messages(salt), max_tokens=12, temperature=0)
            answers[salt] = out.choices[0].message.content
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            errors.append(f"{salt}: {e!r}")

    threads = [threading.Thread(target=ask, args=(s,)) for s in salts]
    for t in threads:
        t.start()
    time.sleep(0.5)
    cluster["procs"][0].kill()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    single = sdk(cluster["single"])
    for s in salts:
        ref = single.chat.completions.create(model=MODEL, messages=long_messages(s), max_tokens=12, temperature=0)
        assert answers[s] == ref.choices[0].message.content, s
    # With the prefill worker gone, prompts are computed where they decode.
    after = g.chat.completions.create(model=MODEL, messages=long_messages(30), max_tokens=8, temperature=0)
    assert after.choices[0].message.content
