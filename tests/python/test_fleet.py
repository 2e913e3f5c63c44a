"""`lastmile serve --workers 2`: one command runs two worker processes behind a kv_aware gateway.
The official SDK talks to it unchanged, a conversation's later turn stays on the worker that served
its first, both workers take conversations, and stopping the command stops the workers."""

import json
import re
import time
import urllib.request

import pytest
from openai import OpenAI

from conftest import MODEL, start_server, stop_server


@pytest.fixture(scope="module")
def fleet():
    # Options for the workers are passed on to them (checked below through their /health).
    url, proc = start_server("--workers", "2", "--debug-headers", "--kernels", "avx2")
    yield url, proc
    if proc.poll() is None:
        stop_server(proc)


def test_conversations_stay_on_their_worker_and_both_workers_serve(fleet):
    url, _ = fleet
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    firsts = set()
    for topic in ["tea", "coffee", "cocoa", "juice"]:
        messages = [
            {"role": "system", "content": f"You know everything about {topic}. " * 8},
            {"role": "user", "content": f"One fact about {topic}?"},
        ]
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        first = raw.headers["x-lastmile-worker"]
        firsts.add(first)
        answer = raw.parse().choices[0].message.content
        time.sleep(0.3)  # the worker's KV events reach the gateway
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another?"}]
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        assert raw.headers["x-lastmile-worker"] == first
    assert len(firsts) == 2, firsts
    assert [m.id for m in client.models.list().data] == [MODEL]


def worker_ports(url):
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    return set(re.findall(r'worker="http://127\.0\.0\.1:(\d+)"', metrics))


def test_the_workers_get_the_commands_engine_options(fleet):
    url, _ = fleet
    ports = worker_ports(url)
    assert len(ports) == 2
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            health = json.load(r)
        assert health["kernels"] == "avx2", health
        assert health["device"]["device"] == "cpu", health


def test_stopping_the_command_stops_its_workers(fleet):
    url, proc = fleet
    ports = worker_ports(url)
    assert len(ports) == 2
    proc.terminate()
    proc.wait(timeout=20)
    time.sleep(0.5)
    for port in ports:
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
