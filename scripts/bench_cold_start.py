#!/usr/bin/env python3
"""Cold start to first token: start the server process, and as soon as it accepts a request send
one streaming chat completion; the time from the process start to the first content chunk is the
cold start. Runs lastmile (`lastmile serve`) and llama.cpp's `llama-server` alternately on the same
GGUF with the same threads, N times each, and prints medians, the breakdown (process start to
ready, ready to first token) and the ratio.

    python3 scripts/bench_cold_start.py [--runs 10] [--threads 2] [--model GGUF]

Needs `cargo build --release` and the llama.cpp anchor (scripts/anchor/build_llama_cpp.sh).
The model file must already be on disk (the default model is fetched by `lastmile models pull`).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"
HOME = Path(os.environ.get("LASTMILE_HOME", Path.home() / ".cache" / "lastmile"))
LLAMA = HOME / "anchor" / "build" / "bin" / "llama-server"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def one_run(cmd, env, url, model):
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not ready(url):
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited early")
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
    servers = {
        "lastmile": lambda port: ([str(BIN), "serve", "--port", str(port), "--threads", str(a.threads),
                                   "--model", a.model, "--served-model-name", "m"],
                                  dict(os.environ, RUST_LOG="warn")),
        "llama.cpp": lambda port: ([str(LLAMA), "-m", a.model, "-t", str(a.threads), "--port", str(port),
                                    "--host", "127.0.0.1", "-c", "4096", "--alias", "m"],
                                   dict(os.environ, LD_LIBRARY_PATH=str(LLAMA.parent))),
    }
    results = {name: [] for name in servers}
    for i in range(a.runs):
        for name, make in servers.items():
            port = free_port()
            cmd, env = make(port)
            r = one_run(cmd, env, f"http://127.0.0.1:{port}", "m")
            results[name].append(r)
            print(f"run {i + 1}/{a.runs} {name}: ready {r[0] * 1e3:.0f} ms, first token {r[1] * 1e3:.0f} ms later, "
                  f"total {r[2] * 1e3:.0f} ms", flush=True)
    med = {n: [statistics.median(x[k] for x in rs) * 1e3 for k in range(3)] for n, rs in results.items()}
    print()
    print(f"| server | process start to ready (ms) | ready to first token (ms) | **cold start to first token (ms)** |")
    print("| --- | ---: | ---: | ---: |")
    for n, (r, f, t) in med.items():
        print(f"| {n} | {r:.0f} | {f:.0f} | **{t:.0f}** |")
    print(f"\nmedians of {a.runs}; lastmile is {med['llama.cpp'][2] / med['lastmile'][2]:.2f}x faster to its first token")


if __name__ == "__main__":
    main()
