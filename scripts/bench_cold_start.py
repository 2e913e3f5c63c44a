#!/usr/bin/env python3
"""Cold start to first token, three ways, alternating in one run on the same GGUF and threads:

- lastmile, process start: start `lastmile serve`, and as soon as it accepts a request send one
  streaming chat completion; the time from the process start to the first content chunk;
- lastmile, scale from zero: a `lastmile serve --config` deployment at zero replicas gets one
  streaming request; the activator holds it, the controller starts a replica, and the request
  flows to it; the time from sending the request to the first content chunk, with its breakdown
  (replica start to healthy, as the controller saw it, split by the replica's own report into
  exec, model file, weights, tokenizer, listening; then hand-off and the first forward);
- llama.cpp's `llama-server`, process start to first token (the anchor).

Prints medians of N runs each and the ratios.

    python3 scripts/bench_cold_start.py [--runs 10] [--threads 2] [--model GGUF]

Needs `cargo build --release` and the llama.cpp anchor (scripts/anchor/build_llama_cpp.sh).
The model file must already be on disk (the default model is fetched by `lastmile models pull`).
"""

import argparse
import json
import os
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import lastmile_proc  # scripts/lastmile_proc.py: starts servers on ports they report

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"
HOME = Path(os.environ.get("LASTMILE_HOME", Path.home() / ".cache" / "lastmile"))
LLAMA = HOME / "anchor" / "build" / "bin" / "llama-server"


def first_token(url, model):
    """Sends one streaming chat request; returns seconds to the first content, or None if the
    server is not ready yet."""
    body = json.dumps({
        "model": model, "max_tokens": 4, "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": "Say hello."}],
    }).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    except urllib.error.HTTPError:
        return None
    return None


def ready(url):
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class FromZero:
    """A `lastmile serve --config` deployment that scales to zero after 1 s idle."""

    def __init__(self, model, threads, workdir):
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "deployments.yaml"
        config.write_text(
            "deployments:\n  - name: m\n"
            f"    model: {model}\n    min_replicas: 0\n    max_replicas: 1\n    threads: {threads}\n"
            "    idle_timeout: 1s\n    autoscaling:\n      stable_window: 2s\n      panic_window: 1s\n"
        )
        self.server = lastmile_proc.start(
            ["serve", "--config", config, "--usage-db", workdir / "usage.db"],
            log=workdir / "serve.log", binary=BIN)
        self.url = self.server.url
        while not ready(self.url):
            if self.server.proc.poll() is not None:
                raise SystemExit(f"lastmile serve --config exited early; see {self.server.log}")
            time.sleep(0.01)

    def status(self):
        return get_json(f"{self.url}/admin/deployments/m")["status"]

    def run(self):
        """One request at zero replicas: (total, breakdown dict) in seconds."""
        while True:
            s = self.status()
            if s["ready"] == 0 and not s["replicas"]:
                break
            time.sleep(0.05)
        t0 = time.perf_counter()
        if not first_token(self.url, "m"):
            raise SystemExit("the request at zero replicas failed")
        total = time.perf_counter() - t0
        s = self.status()
        replica = next(r for r in s["replicas"] if r["state"] == "ready")
        health = get_json(f"{replica['url']}/health")
        startup = health["startup_ms"]
        # The replica has served this one request: its recent TTFT p90 is that request's.
        replica_ttft = (health.get("ttft_p90_ms") or 0) / 1e3
        spawn_to_healthy = s["last_cold_start_ms"] / 1e3
        main_to_ready = startup["main to ready"] / 1e3
        parts = {
            "spawn to healthy": spawn_to_healthy,
            "exec to main (+ health poll)": spawn_to_healthy - main_to_ready,
            "model file mapped and parsed": startup.get("map and parse the file", 0) / 1e3,
            "weights mapped and repacked": startup.get("weights (mapped, repacked)", 0) / 1e3,
            "tokenizer (in parallel)": startup.get("tokenizer (in parallel)", 0) / 1e3,
            "main to listening": main_to_ready,
            "request to spawn, hand-off, first forward": total - spawn_to_healthy,
            "of which: the replica's own time to first token": replica_ttft,
            "of which: wake, hand-off, routing, relaying": total - spawn_to_healthy - replica_ttft,
        }
        return total, parts

    def close(self):
        self.server.stop()


def start_lastmile(args, log):
    """`lastmile ARGS` on a port it reports: (its process, its URL)."""
    server = lastmile_proc.start(args, log=log, binary=BIN)
    return server.proc, server.url


def start_llama_server(args, log):
    """llama-server, which cannot report a port it picked: (its process, its URL)."""
    port = lastmile_proc.free_port_for_foreign_server()
    with open(log, "ab") as out:
        proc = subprocess.Popen([*args, "--port", str(port)], stdout=out, stderr=out,
                                env=dict(os.environ, LD_LIBRARY_PATH=str(LLAMA.parent)))
    return proc, f"http://127.0.0.1:{port}"


def one_run(start, model):
    """Process start to ready, ready to first token, and their sum, in seconds. Both servers
    are timed up to a 200 from /health (lastmile's reports its port as it starts listening)."""
    t0 = time.perf_counter()
    proc, url = start()
    try:
        while not ready(url):
            if proc.poll() is not None:
                raise SystemExit(f"{url} exited early")
            time.sleep(0.002)
        t_ready = time.perf_counter()
        while not first_token(url, model):
            time.sleep(0.002)
        t_first = time.perf_counter()
        return t_ready - t0, t_first - t_ready, t_first - t0
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=str(HOME / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    a = ap.parse_args()
    if not Path(a.model).exists():
        raise SystemExit(f"{a.model} not found (run `lastmile models pull`)")
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"lastmile-cold-{os.getpid()}"
    servers = {
        "lastmile": lambda: start_lastmile(["serve", "--threads", a.threads, "--model", a.model,
                                            "--served-model-name", "m"], workdir / "lastmile.log"),
        "llama.cpp": lambda: start_llama_server([str(LLAMA), "-m", a.model, "-t", str(a.threads),
                                                 "--host", "127.0.0.1", "-c", "4096", "--alias", "m"],
                                                workdir / "llama.cpp.log"),
    }
    results = {name: [] for name in servers}
    zero = FromZero(a.model, a.threads, workdir)
    print(f"server logs in {workdir}", flush=True)
    zero_runs = []
    try:
        for i in range(a.runs):
            for name, start in servers.items():
                r = one_run(start, "m")
                results[name].append(r)
                print(f"run {i + 1}/{a.runs} {name}: ready {r[0] * 1e3:.0f} ms, first token {r[1] * 1e3:.0f} ms "
                      f"later, total {r[2] * 1e3:.0f} ms", flush=True)
            total, parts = zero.run()
            zero_runs.append((total, parts))
            print(f"run {i + 1}/{a.runs} lastmile from zero: request to first token {total * 1e3:.0f} ms "
                  f"(replica spawn to healthy {parts['spawn to healthy'] * 1e3:.0f} ms)", flush=True)
    finally:
        zero.close()
    med = {n: [statistics.median(x[k] for x in rs) * 1e3 for k in range(3)] for n, rs in results.items()}
    zero_med = statistics.median(t for t, _ in zero_runs) * 1e3
    print()
    print("| server | process start to ready (ms) | ready to first token (ms) | **cold start to first token (ms)** |")
    print("| --- | ---: | ---: | ---: |")
    for n, (r, f, t) in med.items():
        print(f"| {n} | {r:.0f} | {f:.0f} | **{t:.0f}** |")
    spawn = statistics.median(p["spawn to healthy"] for _, p in zero_runs) * 1e3
    print(f"| lastmile, request at zero replicas (activator + controller + replica) | {spawn:.0f} (replica spawn to "
          f"healthy) | {zero_med - spawn:.0f} | **{zero_med:.0f}** |")
    print("\nScale from zero, breakdown (medians):\n")
    print("| stage | ms |")
    print("| --- | ---: |")
    for key in zero_runs[0][1]:
        print(f"| {key} | {statistics.median(p[key] for _, p in zero_runs) * 1e3:.0f} |")
    print(f"| **request to first token** | **{zero_med:.0f}** |")
    print(f"\nmedians of {a.runs}; lastmile is {med['llama.cpp'][2] / med['lastmile'][2]:.2f}x faster to its first "
          f"token from process start; a request at zero replicas gets its first token "
          f"{med['llama.cpp'][2] / zero_med:.2f}x faster than llama-server's process start to first token")


if __name__ == "__main__":
    main()
