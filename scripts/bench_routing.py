#!/usr/bin/env python3
"""Routing benchmark: the same multi-turn chat workload through `lastmile gateway` over N local
workers, once per routing policy (kv_aware, round_robin, random), workers restarted between
policies so every run starts with cold caches. Prints mean / p90 TTFT and throughput per policy
and kv_aware's ratios, and writes them to BENCHMARKS.md (section "Routing").

    python3 scripts/bench_routing.py [--workers 4] [--conversations 16] [--turns 6] ...

Needs `cargo build --release` first. Takes a few minutes.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import lastmile_proc  # scripts/lastmile_proc.py: starts servers on ports they report

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"
POLICIES = ["kv_aware", "round_robin", "random"]


def run_policy(policy, args, out_json):
    servers = []
    try:
        urls = []
        for _ in range(args.workers):
            w = lastmile_proc.start(["serve", "--threads", args.threads], binary=BIN)
            servers.append(w)
            urls.append(w.url)
        for w in servers:
            lastmile_proc.wait_healthy(w.url, w.proc)
        cmd = ["gateway", "--policy", policy]
        if policy == "kv_aware" and args.kv_balance is not None:
            cmd += ["--kv-balance", str(args.kv_balance)]
        for url in urls:
            cmd += ["--worker", url]
        g = lastmile_proc.start(cmd, binary=BIN)
        servers.append(g)
        gw = g.url
        print(f"logs: {', '.join(s.log for s in servers)}", flush=True)
        lastmile_proc.wait_healthy(gw, g.proc)
        bench = [
            BIN, "bench", "--url", gw, "--workload", "multi-turn",
            "--requests", str(args.conversations), "--turns", str(args.turns),
            "--concurrency", str(args.concurrency),
            "--system-tokens", str(args.system_tokens), "--input-tokens", str(args.input_tokens),
            "--output-tokens", str(args.output_tokens), "--seed", "1", "--json-out", out_json,
        ]
        print(f"\n== {policy}: {shlex.join(map(str, bench))}", flush=True)
        subprocess.run(bench, check=True)
    finally:
        for s in servers:
            s.proc.terminate()
        for s in servers:
            s.stop(timeout=10)
    doc = json.load(open(out_json))
    return doc["servers"][0]["levels"][0]["summary"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=300)
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--kv-balance", type=float, default=None, help="gateway --kv-balance for kv_aware")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma list (all three to write BENCHMARKS.md)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit("build first: cargo build --release")
    results = {}
    chosen = [p for p in args.policies.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        for policy in chosen:
            results[policy] = run_policy(policy, args, os.path.join(tmp, f"{policy}.json"))
    if set(chosen) != set(POLICIES):
        for policy, s in results.items():
            print(f"{policy}: mean TTFT {s['ttft_ms']['mean']:.0f} ms, p90 {s['ttft_ms']['p90']:.0f} ms, {s['output_tok_s']:.1f} tok/s")
        return
    kv = results["kv_aware"]
    rows = []
    for policy in POLICIES:
        s = results[policy]
        rows.append(
            f"| {policy} | {s['ttft_ms']['mean']:.0f} | {s['ttft_ms']['p90']:.0f} | "
            f"{s['output_tok_s']:.1f} | {s['completed']} | {s['errors']} |"
        )
    ratios = []
    for other in ("random", "round_robin"):
        s = results[other]
        ratios.append(
            f"kv_aware vs {other}: mean TTFT {s['ttft_ms']['mean'] / max(kv['ttft_ms']['mean'], 1e-9):.2f}x lower, "
            f"p90 TTFT {s['ttft_ms']['p90'] / max(kv['ttft_ms']['p90'], 1e-9):.2f}x lower, "
            f"throughput {kv['output_tok_s'] / max(s['output_tok_s'], 1e-9):.2f}x"
        )
    argv = " ".join(sys.argv[1:])
    section = "\n".join(
        [
            "## Routing: kv_aware vs round_robin vs random (gateway over local workers)",
            "",
            f"`python3 scripts/bench_routing.py {argv}`".replace(" `", "`"),
            "",
            f"{args.workers} workers (`lastmile serve --threads {args.threads}`) behind `lastmile gateway`, "
            f"restarted per policy; multi-turn chat: {args.conversations} conversations x {args.turns} turns, "
            f"{args.system_tokens}-token shared system prompt, ~{args.input_tokens}-token user turns, "
            f"{args.output_tokens} tokens out, {args.concurrency} in flight. One run on this 2-core machine.",
            "",
            "| policy | mean TTFT ms | p90 TTFT ms | output tok/s | completed | errors |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
            *[f"- {r}" for r in ratios],
            "",
        ]
    )
    print("\n" + section)
    if args.no_write:
        return
    bench = ROOT / "BENCHMARKS.md"
    text = bench.read_text()
    pattern = re.compile(r"## Routing: .*?(?=\n## |\Z)", re.S)
    text = pattern.sub(section.rstrip() + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    bench.write_text(text)
    print(f"updated {bench}")


if __name__ == "__main__":
    main()
