"""`lastmile serve --config` with keys on, through the official SDKs, unchanged: a deployment at
zero replicas answers the first call (the activator holds it while a replica starts); keys go in
the way each SDK sends them (OpenAI: Authorization: Bearer, Anthropic: x-api-key); a bad key is an
AuthenticationError, a used-up quota a RateLimitError with Retry-After; the usage ledger equals
the usage the SDKs reported."""


import anthropic
import openai
import pytest

from conftest import admin_request, start_server, stop_server

ADMIN = "python-admin-key"
DEPLOYMENT = "smol-serverless"


def admin(url, method, path, body=None):
    return admin_request(url, method, path, body, key=ADMIN)


@pytest.fixture(scope="module")
def serverless(tmp_path_factory):
    d = tmp_path_factory.mktemp("serverless")
    (d / "deployments.yaml").write_text(
        f"deployments:\n  - name: {DEPLOYMENT}\n    min_replicas: 0\n    max_replicas: 1\n"
        "    threads: 1\n    idle_timeout: 10m\n"
    )
    url, proc = start_server(
        "--config", str(d / "deployments.yaml"), "--admin-key", ADMIN, "--usage-db", str(d / "usage.db")
    )
    yield url
    stop_server(proc)


def test_sdks_call_a_scaled_to_zero_deployment_with_keys_and_quotas(serverless):
    url = serverless
    status = admin(url, "GET", f"/admin/deployments/{DEPLOYMENT}")["status"]
    assert status["ready"] == 0 and status["replicas"] == []

    key = admin(url, "POST", "/admin/keys", {"name": "sdk"})
    client = openai.OpenAI(base_url=url + "/v1", api_key=key["key"], max_retries=0)
    assert [m.id for m in client.models.list().data] == [DEPLOYMENT]
    told = [0, 0, 0]

    # The first call finds no replica: it is held while one starts, then answered.
    r = client.chat.completions.create(
        model=DEPLOYMENT, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content
    told = [told[0] + 1, told[1] + r.usage.prompt_tokens, told[2] + r.usage.completion_tokens]
    assert admin(url, "GET", f"/admin/deployments/{DEPLOYMENT}")["status"]["cold_starts"] == 1

    stream = client.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    told = [told[0] + 1, told[1] + usage.prompt_tokens, told[2] + usage.completion_tokens]

    claude = anthropic.Anthropic(base_url=url, api_key=key["key"], max_retries=0)
    m = claude.messages.create(
        model=DEPLOYMENT, max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
    )
    told = [told[0] + 1, told[1] + m.usage.input_tokens, told[2] + m.usage.output_tokens]

    ledger = admin(url, "GET", f"/admin/usage?key={key['id']}")["totals"]
    assert [ledger["requests"], ledger["input_tokens"], ledger["output_tokens"]] == told

    # A wrong key is an authentication error in both SDKs.
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="lm-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="lm-wrong", max_retries=0).messages.create(
            model=DEPLOYMENT, max_tokens=2, messages=[{"role": "user", "content": "x"}]
        )

    # One request per minute: the second is a RateLimitError with Retry-After.
    limited = admin(url, "POST", "/admin/keys", {"name": "one-a-minute", "rpm": 1})
    tight = openai.OpenAI(base_url=url + "/v1", api_key=limited["key"], max_retries=0)
    tight.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": "a"}], max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        tight.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": "b"}], max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert "requests per minute (RPM): limit 1" in e.value.message
