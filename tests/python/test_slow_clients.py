"""Slow clients (slowloris): 2,000 sockets trickling request-head bytes must neither take every
file descriptor nor slow anyone else down, on the worker and on the gateway, each started with
the open-files limit many services get by default (soft 1024)."""

import json
import resource
import socket
import statistics
import subprocess
import threading
import time
import urllib.request

import pytest

from conftest import BINARY, MODEL, _free_port, stop_server

ATTACKERS = 2000


def soft_1024():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


def launch(args, url):
    proc = subprocess.Popen(
        [str(BINARY), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=soft_1024
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=1) as r:
                if r.status == 200 and json.loads(r.read())["data"]:
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{args} did not come up")


def request_ms(url):
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    ).encode()
    t = time.perf_counter()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        r.read()
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        assert r.status == 200
    return (time.perf_counter() - t) * 1e3


@pytest.fixture(scope="module")
def servers():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test needs 2,000+ sockets itself
    wport, gport = _free_port(), _free_port()
    worker_url, gateway_url = f"http://127.0.0.1:{wport}", f"http://127.0.0.1:{gport}"
    worker = launch(["serve", "--port", str(wport), "--threads", "2"], worker_url)
    gateway = launch(["gateway", "--port", str(gport), "--worker", worker_url], gateway_url)
    # Each raised its open-files limit to the hard one at start (it was given soft 1024).
    for p in (worker, gateway):
        with open(f"/proc/{p.pid}/limits") as f:
            soft, hard = next(l.split()[3:5] for l in f if l.startswith("Max open files"))
        assert soft == hard, (soft, hard)
    yield {"worker": worker_url, "gateway": gateway_url}
    stop_server(gateway)
    stop_server(worker)


class Trickle:
    """Sockets that send a request head one header line a second, never finishing it."""

    def __init__(self, port, n):
        self.socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            s.setblocking(False)
            self.socks.append(s)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(1.0):
            for s in self.socks:
                try:
                    s.send(b"X-Slow: 1\r\n")
                except OSError:
                    pass

    def closed_by_server(self):
        n = 0
        for s in self.socks:
            try:
                if s.recv(4096) == b"":
                    n += 1
            except BlockingIOError:
                pass
            except OSError:
                n += 1
        return n

    def close(self):
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


@pytest.mark.parametrize("target", ["worker", "gateway"])
def test_trickling_sockets_neither_starve_nor_slow_others(servers, target):
    url = servers[target]
    port = int(url.rsplit(":", 1)[1])
    baseline = statistics.median(request_ms(url) for _ in range(5))
    attack = Trickle(port, ATTACKERS)
    try:
        during = [request_ms(url) for _ in range(10)]
        # Normal requests complete at their usual latency beside 2,000 stuck sockets.
        assert statistics.median(during) < max(3 * baseline, baseline + 50), (baseline, during)
        assert max(during) < 2000, during
        # The head timeout frees the stuck sockets (10 s of trickle and no complete head).
        deadline = time.time() + 20
        while attack.closed_by_server() < ATTACKERS * 0.9 and time.time() < deadline:
            time.sleep(0.5)
        assert attack.closed_by_server() >= ATTACKERS * 0.9
    finally:
        attack.close()
    assert request_ms(url) < 2000
