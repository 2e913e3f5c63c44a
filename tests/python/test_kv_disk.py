"""The KV tier on disk with real processes: a deployment scaled to zero saves its prefix cache on
the way out, and the replica started again reads a 2,000-token prompt's blocks back instead of
computing them (same answer, a fraction of the time to first token); a worker restarted behind a
kv_aware gateway announces what its disk holds, and the gateway routes that prompt back to it."""

import time

from openai import OpenAI

from conftest import _free_port, MODEL, admin_request, metric, start_lastmile, start_server, stop_server, wait_until

ADMIN = "kv-disk-admin-key"
DEPLOYMENT = "smol-kv-disk"


def document_messages(sentences=125):
    """A chat of about 2,000 prompt tokens."""
    doc = " ".join(
        f"Entry {i}: the {['amber', 'teal', 'violet', 'ochre'][i % 4]} lantern in room {i * 13 % 97} burns {i * 3 + 1} hours."
        for i in range(sentences)
    )
    return [
        {"role": "system", "content": "Answer from the ledger. " + doc},
        {"role": "user", "content": "Which lantern burns longest? One sentence."},
    ]


def ask(client, model, messages):
    """A streamed greedy answer: (text, seconds to the first token, usage)."""
    started = time.perf_counter()
    first = None
    parts = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - started
            parts.append(chunk.choices[0].delta.content)
    assert first is not None and usage is not None
    return "".join(parts), first, usage


def test_a_deployment_scaled_to_zero_reads_its_prompt_back_from_disk(tmp_path):
    kv = tmp_path / "kv"
    config = tmp_path / "deployments.yaml"
    config.write_text(
        f"deployments:\n  - name: {DEPLOYMENT}\n    min_replicas: 0\n    max_replicas: 1\n"
        f"    threads: 2\n    idle_timeout: 3s\n"
        f'    args: ["--kv-disk-dir", "{kv}", "--kv-disk-gib", "1"]\n'
    )
    url, proc = start_server("--config", str(config), "--admin-key", ADMIN)
    try:
        status = lambda: admin_request(url, "GET", f"/admin/deployments/{DEPLOYMENT}", key=ADMIN)["status"]
        key = admin_request(url, "POST", "/admin/keys", {"name": "kv"}, key=ADMIN)["key"]
        client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=180)
        messages = document_messages()

        def from_cold():
            # A short request brings the replica up, so the long one's time to first token is
            # its prompt's alone, not the cold start's.
            client.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
            )
            replica = status()["replicas"][0]["url"]
            return (*ask(client, DEPLOYMENT, messages), replica)

        text, computed_ttft, usage, replica = from_cold()
        assert usage.prompt_tokens >= 1900, usage
        assert metric(replica, "lastmile_kv_disk_hit_blocks_total") == 0
        # Idle: scaled to zero. The replica saves its cache before it exits.
        wait_until(lambda: status()["replicas"] == [], "the deployment scaled to zero", timeout=90)
        files = list(kv.rglob("*.kvb"))
        assert len(files) >= usage.prompt_tokens // 16 - 1, len(files)

        again, read_ttft, usage_again, replica = from_cold()
        assert status()["cold_starts"] == 2
        assert again == text, "blocks read back from disk give the same greedy answer"
        assert usage_again.prompt_tokens == usage.prompt_tokens
        hits = metric(replica, "lastmile_kv_disk_hit_blocks_total")
        assert hits >= (usage.prompt_tokens - 1) // 16 - 1, hits
        assert metric(replica, "lastmile_kv_disk_errors_total") == 0
        assert read_ttft < computed_ttft / 2, (
            f"time to first token {read_ttft:.3f} s with the prompt on disk, {computed_ttft:.3f} s computed"
        )
    finally:
        stop_server(proc)


def _serve_on(port, *args):
    """`lastmile serve` on a given port (a restarted worker keeps its address)."""
    return start_lastmile("serve", *args, port=port)


def test_a_restarted_worker_announces_its_disk_and_gets_the_prompt_back(tmp_path):
    kv = tmp_path / "kv"
    port = _free_port()
    args = ["--threads", "1", "--kv-disk-dir", str(kv), "--kv-disk-gib", "1"]
    with_disk, proc = _serve_on(port, *args)
    other, other_proc = start_server("--threads", "1")
    gateway = gateway_proc = None
    try:
        messages = document_messages(60)
        direct = OpenAI(base_url=with_disk + "/v1", api_key="x", max_retries=0, timeout=180)
        text, _, usage = ask(direct, MODEL, messages)
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        saved = proc.stderr.read().decode(errors="replace")
        assert "KV blocks to the disk tier" in saved, saved
        with_disk, proc = _serve_on(port, *args)
        assert metric(with_disk, "lastmile_kv_disk_blocks") >= usage.prompt_tokens // 16 - 1

        gateway, gateway_proc = start_lastmile(
            "gateway", "--policy", "kv_aware", "--debug-headers", "--health-interval-ms", "100",
            "--worker", other, "--worker", with_disk,
        )
        wait_until(
            lambda: all(
                metric(gateway, "lastmile_gateway_worker_available", f'worker="{w}"') == 1
                for w in (other, with_disk)
            ),
            "both workers available at the gateway",
        )
        client = OpenAI(base_url=gateway + "/v1", api_key="x", max_retries=0, timeout=180)
        # The gateway learned the restarted worker's blocks from its snapshot: the prompt goes
        # there (every time), and is read back from disk, not computed.
        for _ in range(2):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, max_tokens=12, temperature=0
            )
            assert raw.headers["x-lastmile-worker"] == with_disk
            assert raw.parse().choices[0].message.content == text
        assert metric(with_disk, "lastmile_kv_disk_hit_blocks_total") >= usage.prompt_tokens // 16 - 1
        assert metric(other, "lastmile_engine_prefill_tokens_total") == 0
    finally:
        for p in (proc, other_proc, gateway_proc):
            if p is not None and p.poll() is None:
                stop_server(p)
