"""Starts the real `lastmile serve` binary (default model) on a free port for the SDK tests."""

import json
import os
import re
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
    return start_lastmile("serve", *args)


def start_lastmile(command, *args, port=None):
    """Starts `lastmile COMMAND ARGS` (a server) on `port` (default: a free one); returns (base URL,
    process) once its /health answers 200."""
    port = port or _free_port()
    proc = subprocess.Popen(
        [str(BINARY), command, "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"lastmile {command} exited: " + proc.stderr.read().decode(errors="replace"))
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return url, proc
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"lastmile {command} did not become healthy in 120 s")
        time.sleep(0.2)


def metric(url, name, labels=""):
    """The value of a metric series on `url`/metrics (0 when absent)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        page = r.read().decode()
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", page, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(check, what, timeout=20):
    """Polls `check` every 0.1 s until it holds; fails after `timeout` seconds."""
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


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


SANDBOX_ADMIN_KEY = "sandbox-admin-key-0123456789abcdef"
SANDBOX_CANARY = "canary-9f1c2d7e-never-inside-a-sandbox"


def admin_request(url, method, path, body=None, key=None):
    """A JSON call to a server's admin API (the sandbox server's admin key by default)."""
    key = key or SANDBOX_ADMIN_KEY
    req = urllib.request.Request(
        url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
        return json.loads(text) if text else None


def start_sandbox_server(tmp, *extra, open_server=False):
    """`lastmile sandbox` with keys on (the admin key and a canary in its environment; no keys
    with `open_server`, as on a loopback address it may be) and `extra` options; returns (URL,
    process, log file) once it answers."""
    port = _free_port()
    env = dict(os.environ)
    env.pop("LASTMILE_ADMIN_KEY", None)
    if not open_server:
        env["LASTMILE_ADMIN_KEY"] = SANDBOX_ADMIN_KEY
    env["LASTMILE_TEST_CANARY"] = SANDBOX_CANARY
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [str(BINARY), "sandbox", "--port", str(port), "--usage-db", str(tmp / "keys.db"), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError("lastmile sandbox exited: " + (tmp / "server.log").read_text(errors="replace"))
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status in (200, 503):
                    break
        except urllib.error.HTTPError as e:
            if e.code == 503:
                break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("lastmile sandbox did not answer in 30 s")
        time.sleep(0.1)
    return url, proc, log


@pytest.fixture(scope="session")
def sandbox_server(tmp_path_factory):
    """`lastmile sandbox` with keys on, a `web` template, 6 sandboxes per key."""
    tmp = tmp_path_factory.mktemp("sandbox")
    (tmp / "templates.yaml").write_text(
        "templates:\n"
        "  - name: web\n"
        "    memory_mb: 256\n"
        "    cpus: 0.5\n"
        "    start_cmd: python3 -m http.server 8000 --bind 127.0.0.1\n"
    )
    url, proc, log = start_sandbox_server(
        tmp, "--sandbox-max-per-key", "6", "--sandbox-templates", str(tmp / "templates.yaml"))
    yield url, proc
    stop_server(proc)
    log.close()


@pytest.fixture(scope="session")
def gateway_with_sandboxes(base_url, tmp_path_factory):
    """A keyed gateway in front of the session's worker, with sandboxes (and so /mcp)."""
    tmp = tmp_path_factory.mktemp("mcp-gateway")
    port = _free_port()
    proc = subprocess.Popen(
        [str(BINARY), "gateway", "--port", str(port), "--worker", base_url, "--sandboxes",
         "--admin-key", SANDBOX_ADMIN_KEY, "--usage-db", str(tmp / "usage.db")],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "log", "wb"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    yield url
    stop_server(proc)
