#!/usr/bin/env python3
"""The KV tier on disk: time to first token of a long shared prompt after scale-to-zero and back,
with and without the tier, one run, same machine, rounds alternating between the two.

Each round, for each setup: start `lastmile serve` (with `--kv-disk-dir` or without), send the
round's prompt (--prompt-tokens of a distinct document, greedy, --max-tokens out), stop the
server with SIGTERM (what scale-to-zero does: the server drains, and with the tier saves its
prefix cache), start it again on the same directory, and send the same prompt the moment it
listens. Measured at the client, streaming: that second request's time to first token (TTFT),
and the time from starting the process to that first token (a cold start plus TTFT). The answers
of both setups must match. Medians over the rounds; the ratio is no-tier / tier.

    python3 scripts/bench_kv_disk.py [--rounds 5] [--prompt-tokens 2000] [--threads 2]

Needs `cargo build --release` and the default model on disk (`lastmile models pull`).
"""

import argparse
import json
import random
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import lastmile_proc  # scripts/lastmile_proc.py: starts servers on ports they report
from bench_engine import cpu_description

WORDS = ("river stone market window garden engine letter summer silver harbor candle forest "
         "ladder pocket thunder meadow copper lantern violin orchard").split()


def document(seed, tokens):
    rng = random.Random(seed)
    # One token per word of this vocabulary (with its space); the chat around it adds about 40.
    return f"Document {seed}: " + " ".join(rng.choice(WORDS) for _ in range(max(tokens - 40, 1)))


def ask(url, messages, max_tokens):
    """One streamed greedy chat request: (seconds to first token, text, prompt tokens)."""
    body = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    sent = time.perf_counter()
    first, parts, prompt_tokens = None, [], None
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            for c in chunk.get("choices", []):
                text = c.get("delta", {}).get("content")
                if text:
                    first = first if first is not None else time.perf_counter() - sent
                    parts.append(text)
    return first, "".join(parts), prompt_tokens


def metric(url, name):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        m = re.search(rf"^{re.escape(name)} (\S+)$", r.read().decode(), re.M)
    return float(m.group(1)) if m else 0.0


def round_trip(setup, seed, args, logdir):
    """One round of one setup: (TTFT after the restart, process start to first token, answer,
    prompt tokens, disk blocks read back)."""
    disk = Path(tempfile.mkdtemp(prefix="lastmile-kv-disk-")) if setup == "disk tier" else None
    flags = ["serve", "--threads", args.threads, "--served-model-name", "m"]
    if disk:
        flags += ["--kv-disk-dir", disk, "--kv-disk-gib", "4"]
    messages = [{"role": "system", "content": "Summarize the document. " + document(seed, args.prompt_tokens)},
                {"role": "user", "content": "What is the document about?"}]
    log = logdir / f"{setup.replace(' ', '-')}-{seed}.log"
    try:
        with lastmile_proc.start(flags, log=log) as server:
            _, computed, _ = ask(server.url, messages, args.max_tokens)
        # Scaled to zero (the `with` ends with SIGTERM) and back.
        started = time.perf_counter()
        with lastmile_proc.start(flags, log=log) as server:
            ttft, answer, prompt_tokens = ask(server.url, messages, args.max_tokens)
            cold = time.perf_counter() - started
            hits = metric(server.url, "lastmile_kv_disk_hit_blocks_total")
        if answer != computed:
            raise SystemExit(f"{setup}: the answer after the restart differs from the first one")
        return ttft, cold, answer, prompt_tokens, hits
    finally:
        if disk:
            shutil.rmtree(disk, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logdir = Path("/tmp/lastmile-bench-kv-disk")
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}", flush=True)
    results = {"disk tier": [], "no disk tier": []}
    for k in range(args.rounds):
        setups = ["disk tier", "no disk tier"] if k % 2 == 0 else ["no disk tier", "disk tier"]
        answers = {}
        for setup in setups:
            ttft, cold, answer, prompt_tokens, hits = round_trip(setup, 1000 + k, args, logdir)
            answers[setup] = answer
            results[setup].append({"ttft_s": ttft, "start_to_first_token_s": cold,
                                   "prompt_tokens": prompt_tokens, "disk_hit_blocks": hits})
            print(f"round {k + 1}: {setup:>12}: TTFT {ttft * 1e3:7.1f} ms, process start to first token "
                  f"{cold:.2f} s ({prompt_tokens} prompt tokens, {hits:.0f} blocks read from disk)", flush=True)
        if answers["disk tier"] != answers["no disk tier"]:
            raise SystemExit("the two setups answered differently")
    med = {s: {m: statistics.median(r[m] for r in rs) for m in ("ttft_s", "start_to_first_token_s")}
           for s, rs in results.items()}
    tier, none = med["disk tier"], med["no disk tier"]
    print("\n| setup | TTFT after restart, median | process start to first token, median |")
    print("| --- | ---: | ---: |")
    for s in ("no disk tier", "disk tier"):
        print(f"| {s} | {med[s]['ttft_s'] * 1e3:.0f} ms | {med[s]['start_to_first_token_s']:.2f} s |")
    print(f"TTFT: no tier / tier = {none['ttft_s'] / tier['ttft_s']:.1f}x lower with the tier; "
          f"start to first token: {none['start_to_first_token_s'] / tier['start_to_first_token_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": results, "medians": med, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
