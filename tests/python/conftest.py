"""Starts the real `lastmile serve` binary (default model) on a free port for the SDK tests."""

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("LASTMILE_BIN", ROOT / "target" / "release" / "lastmile"))
MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args):
    """Starts `lastmile serve ARGS` on a free port; returns (base URL, process) once healthy."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError("lastmile serve exited: " + proc.stderr.read().decode(errors="replace"))
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return url, proc
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("lastmile serve did not become healthy in 120 s")
        time.sleep(0.2)


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def base_url():
    url, proc = start_server("--threads", "2")
    yield url
    stop_server(proc)


@pytest.fixture(scope="session")
def client(base_url):
    from openai import OpenAI

    return OpenAI(base_url=base_url + "/v1", api_key="not-needed", max_retries=0)
