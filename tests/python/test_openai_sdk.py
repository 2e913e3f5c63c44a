"""The official `openai` Python package drives lastmile unchanged: chat, streaming, completions,
models, and errors raised as the SDK's own exception types."""

import concurrent.futures

import openai
import pytest

from conftest import MODEL


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_streaming(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 4
    pieces = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == r.choices[0].text


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="A list of animals:", max_tokens=16, temperature=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_concurrent_requests(client):
    def ask(i):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say the number {i}."}], max_tokens=8, temperature=0
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(8)))
    assert all(r.choices[0].message.content for r in results)


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_errors_are_sdk_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    assert "context length" in str(e.value)


def test_bench_against_a_url_fetches_no_model(base_url, tmp_path):
    """`lastmile bench --url` measures a server that is already running: it needs no model of
    its own, so a home with none stays empty (it used to fetch the default model first)."""
    import json
    import os
    import subprocess

    from conftest import BINARY

    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "report.json"
    r = subprocess.run(
        [str(BINARY), "bench", "--url", base_url, "--concurrency", "1", "--requests", "2",
         "--input-tokens", "16", "--output-tokens", "4", "--json-out", str(out)],
        env=dict(os.environ, LASTMILE_HOME=str(home)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(home.rglob("*")) == [], list(home.rglob("*"))
    assert json.loads(out.read_text()), "a report was written"


GROUNDED = (
    "Repeat this sentence exactly, twice: The committee approved the new budget for the city "
    "library, which will open three new branches next spring."
)


def _draft_counter(base_url, name):
    import urllib.request

    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        page = r.read().decode()
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def _accepted_draft_tokens(base_url):
    return _draft_counter(base_url, "lastmile_engine_accepted_draft_tokens_total")


def _drafts(base_url):
    """(draft tokens verified, draft tokens kept) so far."""
    return (_draft_counter(base_url, "lastmile_engine_draft_tokens_total"), _accepted_draft_tokens(base_url))


def test_speculative_decoding_is_an_extension_that_changes_no_greedy_token(client, base_url):
    messages = [{"role": "user", "content": GROUNDED}]
    kw = dict(model=MODEL, messages=messages, max_tokens=60, temperature=0)
    plain = client.chat.completions.create(**kw, extra_body={"speculative": {"max_draft": 0}})
    before = _accepted_draft_tokens(base_url)
    spec = client.chat.completions.create(**kw, extra_body={"speculative": {"ngram": 3, "max_draft": 8}})
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.usage.completion_tokens == plain.usage.completion_tokens
    assert _accepted_draft_tokens(base_url) > before, "the answer repeats the prompt: drafts are kept"
    streamed = client.chat.completions.create(**kw, stream=True, extra_body={"speculative": {}})
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == plain.choices[0].message.content
    # Sampling with a seed: the same answer with drafts as without.
    sampled = dict(model=MODEL, prompt=GROUNDED, max_tokens=30, temperature=0.8, seed=11)
    with_drafts = client.completions.create(**sampled, extra_body={"speculative": {"max_draft": 6}})
    without = client.completions.create(**sampled, extra_body={"speculative": {"max_draft": 0}})
    assert with_drafts.choices[0].text == without.choices[0].text
    # Out of range, a misspelt key, an unknown method, or a draft model this server was not
    # started with: a 400 naming the field.
    for bad in ({"max_draft": 99}, {"ngram": 0}, {"ngrams": 2}, {"method": "medusa"}, {"method": "draft_model"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kw, extra_body={"speculative": bad})
        named = ("speculative", "ngrams", "medusa")
        assert any(n in str(e.value) for n in named), (bad, str(e.value))


def test_a_draft_model_server_answers_token_for_token_as_without_drafts(tmp_path):
    """`serve --draft-model`: a 20-block cut of the default model (same tokenizer, a cheaper and
    sometimes wrong guesser) drafts for every request that does not choose; answers are the
    ones decoding without drafts gives, through the SDK, streamed or not."""
    import json
    import subprocess
    import sys
    import urllib.request

    from conftest import BINARY, ROOT, start_server, stop_server

    pulled = subprocess.run([str(BINARY), "models", "pull"], capture_output=True, text=True, check=True)
    model = pulled.stdout.strip().splitlines()[-1]
    draft = tmp_path / "draft.gguf"
    subprocess.run([sys.executable, str(ROOT / "scripts/cuda/cut_model.py"), model, str(draft), "--blocks", "20"],
                   check=True, capture_output=True)
    url, proc = start_server("--threads", "2", "--draft-model", str(draft))
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            health = json.loads(r.read())
        assert health["draft_model"]["layers"] == 20, health
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        for prompt in ("The history of Rome", "def fibonacci(n):", "1, 2, 3, 4, 5,"):
            kw = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
            plain = client.completions.create(**kw, extra_body={"speculative": {"max_draft": 0}})
            before = _drafts(url)
            by_default = client.completions.create(**kw)
            after = _drafts(url)
            assert by_default.choices[0].text == plain.choices[0].text, prompt
            assert after[0] > before[0], "the draft model drafted"
            explicit = client.completions.create(**kw, extra_body={"speculative": {"method": "draft_model", "max_draft": 4}})
            assert explicit.choices[0].text == plain.choices[0].text
            lookup = client.completions.create(**kw, extra_body={"speculative": {"method": "prompt_lookup"}})
            assert lookup.choices[0].text == plain.choices[0].text
            streamed = client.completions.create(**kw, stream=True)
            assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text
        drafted, kept = _drafts(url)
        assert 0 < kept < drafted, (kept, drafted)
        # A seeded sample: the same answer with the draft model's drafts as without.
        sampled = dict(model=MODEL, prompt="Once upon a time", max_tokens=30, temperature=0.9, seed=5)
        off = client.completions.create(**sampled, extra_body={"speculative": {"max_draft": 0}})
        on = client.completions.create(**sampled)
        assert on.choices[0].text == off.choices[0].text
    finally:
        stop_server(proc)
