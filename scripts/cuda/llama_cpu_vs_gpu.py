#!/usr/bin/env python3
"""How often llama.cpp agrees with itself between its CPU and CUDA backends: greedy, 32 tokens,
on the prompts of lastmile's GPU-vs-CPU check (crates/engine/tests/fixtures/gpu_prompts.json). The yardstick for
that check: free-running greedy text parts at the first near-tie, on any two backends.

    python3 scripts/cuda/llama_cpu_vs_gpu.py LLAMA_SERVER MODEL.gguf
"""

import json
import os
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lastmile_proc import free_port_for_foreign_server, wait_healthy  # noqa: E402

# The prompts of lastmile's own GPU-vs-CPU check, from the same file.
PROMPTS = json.load(
    open(os.path.join(os.path.dirname(__file__), "../../crates/engine/tests/fixtures/gpu_prompts.json"))
)


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def greedy(server, model, ngl):
    port = free_port_for_foreign_server()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.path.dirname(server) + ":" + env.get("LD_LIBRARY_PATH", "")
    proc = subprocess.Popen(
        [server, "-m", model, "-ngl", str(ngl), "-t", "8", "-c", "4096", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        out = []
        for p in PROMPTS:
            r = post(url + "/completion", {"prompt": p, "n_predict": 32, "temperature": 0,
                                           "top_k": 1, "ignore_eos": True, "cache_prompt": False,
                                           "return_tokens": True})
            out.append(r.get("tokens") or r["content"])
        return out
    finally:
        proc.kill()
        proc.wait()


def main():
    server, model = sys.argv[1], sys.argv[2]
    cpu, gpu = greedy(server, model, 0), greedy(server, model, 999)
    same = 0
    for p, a, b in zip(PROMPTS, cpu, gpu):
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += a == b
        print(f"{p!r}: {'same' if a == b else 'differs'} ({agree} tokens agree)")
    print(f"llama.cpp greedy CPU vs CUDA: {same} of {len(PROMPTS)} prompts identical")


if __name__ == "__main__":
    main()
