#!/usr/bin/env python3
"""Soak: many concurrent streams through a keyed gateway for a long time, some of them cut
short by their clients at random, with the official `openai` SDK.

It shows three things and exits non-zero if one fails:
1. No errors but the intended ones: every stream a client did not cut ends with a finish reason
   and a usage chunk; the cut ones end because the client closed them. Any HTTP error, timeout
   or broken stream counts as a failure.
2. Memory flat after warm-up: the resident memory (RSS) of the gateway and the worker, sampled
   every 5 s, ends within 10% (+16 MiB) of what it was once warm: after the first minute and
   once the worker's KV cache pool has been filled (its pages are touched as the prefix cache
   first fills them: 1 GiB by default, which takes minutes).
3. The usage ledger is right: for the key whose streams ran to the end, the ledger's requests,
   input and output tokens equal the sums of the usage the SDK reported; for the key whose
   streams were cut, it counted every request and charged no more than their prompts and
   output limits.

    python3 scripts/soak.py [--seconds 600] [--streams 256] [--cut 0.25] [--plot docs/soak.svg]

Needs `cargo build --release` and the model (`lastmile models pull`); `pip install openai`.
"""

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import lastmile_proc  # scripts/lastmile_proc.py: wait_healthy

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"
MODEL = "smollm2-135m-instruct"
ADMIN = "soak-admin-key-0123456789abcdef"
PROMPTS = [
    "Count from one to ten.",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me a word that rhymes with cat.",
    "Describe a cloud in one sentence.",
    "List the days of the week.",
    "Say something kind.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, key=ADMIN):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def kv_fill(worker_url):
    """The fraction of the worker's KV blocks that hold a sequence or a cached prefix."""
    try:
        with urllib.request.urlopen(f"{worker_url}/metrics", timeout=2) as r:
            text = r.read().decode()
    except Exception:
        return 0.0
    v = {}
    for line in text.splitlines():
        for k in ("lastmile_kv_blocks_used", "lastmile_kv_blocks_cached", "lastmile_kv_blocks_total"):
            if line.startswith(k + " "):
                v[k] = float(line.split()[1])
    total = v.get("lastmile_kv_blocks_total", 0)
    # A block both in use and cached counts once.
    return min(1.0, (v.get("lastmile_kv_blocks_used", 0) + v.get("lastmile_kv_blocks_cached", 0)) / total) \
        if total else 0.0


def cpu_name():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


class Tally:
    def __init__(self):
        self.whole = [0, 0, 0]  # requests, prompt tokens, completion tokens (SDK usage)
        self.cut = 0
        self.cut_prompt_bound = 0  # the prompts' tokens (learned from whole streams)
        self.cut_output_bound = 0  # their max_tokens
        self.errors = []
        self.prompt_tokens = {}


async def one_stream(client_whole, client_cut, tally, rng):
    prompt = rng.choice(PROMPTS)
    max_tokens = rng.randint(8, 48)
    cut = rng.random() < tally.cut_fraction
    client = client_cut if cut else client_whole
    stop_after = rng.randint(1, 6)
    chunks = 0
    try:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.8,
            stream=True,
            stream_options={"include_usage": True},
        )
        finish, usage = None, None
        async for chunk in stream:
            chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                usage = chunk.usage
            if cut and chunks >= stop_after:
                await stream.close()
                break
        if cut:
            tally.cut += 1
            tally.cut_output_bound += max_tokens
            tally.cut_prompt_bound += tally.prompt_tokens.get(prompt, 10_000)
            return
        if finish is None or usage is None:
            tally.errors.append(f"stream ended without finish/usage after {chunks} chunks")
            return
        tally.prompt_tokens[prompt] = usage.prompt_tokens
        tally.whole[0] += 1
        tally.whole[1] += usage.prompt_tokens
        tally.whole[2] += usage.completion_tokens
    except Exception as e:  # any error is a failure of the soak
        tally.errors.append(f"{type(e).__name__}: {e}"[:300])


async def drive(gw, worker_url, keys, seconds, streams, cut, seed, samples, pids):
    from openai import AsyncOpenAI
    import httpx

    limits = httpx.Limits(max_connections=streams + 16, max_keepalive_connections=streams + 16)
    mk = lambda key: AsyncOpenAI(
        base_url=f"{gw}/v1", api_key=key, max_retries=0, timeout=180.0,
        http_client=httpx.AsyncClient(limits=limits, timeout=180.0),
    )
    client_whole, client_cut = mk(keys["whole"]), mk(keys["cut"])
    tally = Tally()
    tally.cut_fraction = cut
    # Learn every prompt's token count first (whole streams, counted like the rest).
    warm = random.Random(seed)
    for p in PROMPTS:
        r = await client_whole.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=1)
        tally.prompt_tokens[p] = r.usage.prompt_tokens
        tally.whole[0] += 1
        tally.whole[1] += r.usage.prompt_tokens
        tally.whole[2] += r.usage.completion_tokens
    started = time.time()
    end = started + seconds

    async def worker(i):
        rng = random.Random(seed * 1000 + i)
        while time.time() < end:
            await one_stream(client_whole, client_cut, tally, rng)

    async def sampler():
        while time.time() < end:
            t = time.time() - started
            samples.append((t, rss_mib(pids["gateway"]), rss_mib(pids["worker"]),
                            tally.whole[0] + tally.cut, len(tally.errors), kv_fill(worker_url)))
            done = tally.whole[0] + tally.cut
            print(f"  {t:6.0f} s  {done:6d} streams ({tally.cut} cut)  errors {len(tally.errors)}"
                  f"  rss gateway {samples[-1][1]:.0f} MiB, worker {samples[-1][2]:.0f} MiB"
                  f"  (KV pool {samples[-1][5]:.0%} filled)", flush=True)
            await asyncio.sleep(5)

    await asyncio.gather(sampler(), *(worker(i) for i in range(streams)))
    samples.append((time.time() - started, rss_mib(pids["gateway"]), rss_mib(pids["worker"]),
                    tally.whole[0] + tally.cut, len(tally.errors), kv_fill(worker_url)))
    del warm
    return tally


def svg_plot(samples, path, title):
    """RSS of gateway and worker over time, as an SVG line plot."""
    w, h, pad = 720, 320, 50
    tmax = max(s[0] for s in samples) or 1
    ymax = max(max(s[1], s[2]) for s in samples) * 1.15 or 1
    X = lambda t: pad + (w - 2 * pad) * t / tmax
    Y = lambda v: h - pad - (h - 2 * pad) * v / ymax
    lines = []
    for idx, colour, name in [(1, "#1f77b4", "gateway"), (2, "#d62728", "worker")]:
        pts = " ".join(f"{X(s[0]):.1f},{Y(s[idx]):.1f}" for s in samples)
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        lines.append(f'<text x="{w - pad - 90}" y="{pad + 18 * idx}" fill="{colour}" '
                     f'font-size="13">{name} RSS</text>')
    ticks = []
    for i in range(6):
        v = ymax * i / 5
        ticks.append(f'<text x="{pad - 6}" y="{Y(v) + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{v:.0f}</text>')
        t = tmax * i / 5
        ticks.append(f'<text x="{X(t):.1f}" y="{h - pad + 16}" font-size="11" '
                     f'text-anchor="middle">{t:.0f}</text>')
    Path(path).write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif">\n<rect width="{w}" height="{h}" fill="white"/>\n'
        f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>\n'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>\n'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>\n'
        f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle" font-size="12">seconds</text>\n'
        f'<text x="14" y="{h / 2}" font-size="12" transform="rotate(-90 14 {h / 2})" '
        f'text-anchor="middle">MiB</text>\n' + "\n".join(ticks + lines) + "\n</svg>\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=600, help="how long the streams run")
    ap.add_argument("--streams", type=int, default=256, help="concurrent streams")
    ap.add_argument("--cut", type=float, default=0.25, help="fraction of streams cut short")
    ap.add_argument("--threads", type=int, default=2, help="the worker's compute threads")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plot", help="write the RSS plot (SVG) here")
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit("build first: cargo build --release")
    tmp = Path(tempfile.mkdtemp(prefix="lastmile-soak-"))
    wp, gp = free_port(), free_port()
    worker_url, gw = f"http://127.0.0.1:{wp}", f"http://127.0.0.1:{gp}"
    env = dict(os.environ, RUST_LOG="warn")
    procs = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN), "serve", "--port", str(wp), "--threads", str(args.threads)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "w")))
        lastmile_proc.wait_healthy(worker_url)
        procs.append(subprocess.Popen(
            [str(BIN), "gateway", "--port", str(gp), "--worker", worker_url,
             "--admin-key", ADMIN, "--usage-db", str(tmp / "usage.db"),
             "--key-max-in-flight", str(args.streams * 2)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "w")))
        lastmile_proc.wait_healthy(gw)
        keys, ids = {}, {}
        for name in ["whole", "cut"]:
            k = http("POST", f"{gw}/admin/keys", {"name": f"soak-{name}"})
            keys[name], ids[name] = k["key"], k["id"]
        pids = {"worker": procs[0].pid, "gateway": procs[1].pid}
        samples = []
        print(f"soak: {args.streams} streams for {args.seconds} s, {args.cut:.0%} cut short, "
              f"through {gw} -> {worker_url}", flush=True)
        tally = asyncio.run(drive(gw, worker_url, keys, args.seconds, args.streams, args.cut, args.seed,
                                  samples, pids))
        time.sleep(2)  # the last streams' usage settles as their bodies are dropped
        ledger = {n: http("GET", f"{gw}/admin/usage?key={ids[n]}")["totals"] for n in ids}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()

    warm = [s for s in samples if s[0] >= 60 and s[5] >= 0.97]
    warmed = bool(warm)
    warm = warm or [s for s in samples if s[0] >= 60] or samples
    first, last = warm[0], samples[-1]
    peak = (max(s[1] for s in warm), max(s[2] for s in warm))
    flat = all(last[i] <= first[i] * 1.10 + 16 for i in (1, 2))
    whole = {"requests": tally.whole[0], "input_tokens": tally.whole[1],
             "output_tokens": tally.whole[2]}
    whole_ok = ledger["whole"] == whole
    cut_ok = (ledger["cut"]["requests"] == tally.cut
              and ledger["cut"]["input_tokens"] <= tally.cut_prompt_bound
              and ledger["cut"]["output_tokens"] <= tally.cut_output_bound)
    errors = sorted(set(tally.errors))
    rate = (tally.whole[0] + tally.cut) / max(samples[-1][0], 1)
    report = f"""| measure | result |
| --- | --- |
| machine | {cpu_name()}, {os.cpu_count()} cores; worker `--threads {args.threads}` |
| load | {args.streams} concurrent streams for {args.seconds} s through a keyed gateway, {args.cut:.0%} cut short by the client after 1-6 chunks (`openai` SDK) |
| streams | {tally.whole[0] + tally.cut} ({tally.whole[0]} to the end, {tally.cut} cut), {rate:.1f}/s |
| errors other than the intended cuts | **{len(tally.errors)}** {'' if not errors else '(' + '; '.join(errors[:3]) + ')'} |
| RSS once warm ({first[0]:.0f} s{'' if warmed else ', KV pool never filled'}) -> end (peak) | gateway {first[1]:.0f} -> {last[1]:.0f} MiB ({peak[0]:.0f}); worker {first[2]:.0f} -> {last[2]:.0f} MiB ({peak[1]:.0f}): **{'flat' if flat else 'GROWING'}** |
| ledger, streams to the end | {ledger['whole']} vs SDK usage {whole}: **{'equal' if whole_ok else 'DIFFERENT'}** |
| ledger, cut streams | {ledger['cut']} for {tally.cut} requests (bounds: input <= {tally.cut_prompt_bound}, output <= {tally.cut_output_bound}): **{'within' if cut_ok else 'OUTSIDE'}** |
"""
    print()
    print(report)
    print(f"reproduce: python3 scripts/soak.py --seconds {args.seconds} --streams {args.streams} "
          f"--cut {args.cut}")
    if args.plot:
        svg_plot(samples, args.plot, f"RSS under {args.streams} streams for {args.seconds} s "
                 f"(warm from {first[0]:.0f} s)")
        print(f"plot: {args.plot}")
    ok = not tally.errors and flat and whole_ok and cut_ok and warmed
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
