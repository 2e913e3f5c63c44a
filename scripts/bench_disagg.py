#!/usr/bin/env python3
"""Disaggregated prefill and decode against co-located workers, same cores both ways, one run.

Both setups get the same threads: disaggregated is one `--role prefill` and one `--role decode`
worker of --threads each behind a kv_aware gateway that splits prompts of --min-tokens uncached
tokens and more; co-located is two ordinary workers of --threads each behind a kv_aware gateway.

Workload, for each arrival rate of the sweep: --chats decode-heavy chat streams running all along
(a short question, --chat-tokens generated, then the next), plus long prompts (--long-min to
--long-max tokens of a distinct document each, --long-out tokens generated) arriving as a Poisson
process at the rate. Every request streams; its time to first token and its gaps between tokens
are measured at the client. Goodput is the requests per second that meet both SLOs: TTFT <=
--ttft-slo seconds and p99 inter-token gap <= --itl-slo ms (the strict ITL SLO is what
disaggregation is for). Also reported: TTFT and ITL p50/p99 of chats and of long prompts, and the
time the decode worker spent pulling KV against the time prefill workers spent computing.

Prints a table, writes JSON (--json) and an SVG plot of goodput and chat ITL p99 over the rates
(--svg).

    python3 scripts/bench_disagg.py [--rates 0.1,0.2,0.3] [--window 30] [--threads 1]

Needs `cargo build --release` and the default model on disk (`lastmile models pull`).
"""

import argparse
import json
import random
import re
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import lastmile_proc  # scripts/lastmile_proc.py: starts servers on ports they report

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-disagg-internal-token"
WORDS = ("river stone market window garden engine letter summer silver harbor candle forest "
         "ladder pocket thunder meadow copper lantern violin orchard").split()


def document(seed, tokens):
    rng = random.Random(seed)
    # One token per word of this vocabulary (with its space).
    words = [rng.choice(WORDS) for _ in range(tokens)]
    return f"Document {seed}: " + " ".join(words)


def stream(url, messages, max_tokens):
    """One streaming chat request: (ttft seconds, [gaps between tokens], ok)."""
    body = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"content-type": "application/json"})
    sent = time.perf_counter()
    stamps = []
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                    stamps.append(time.perf_counter())
    except OSError:
        return None, [], False
    if not stamps:
        return None, [], False
    return stamps[0] - sent, [b - a for a, b in zip(stamps, stamps[1:])], True


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def metric_sum(url, name):
    """Sum and count of a histogram on url/metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        page = r.read().decode()
    s = re.search(rf"^{name}_sum (\S+)$", page, re.M)
    c = re.search(rf"^{name}_count (\S+)$", page, re.M)
    return (float(s.group(1)) if s else 0.0, float(c.group(1)) if c else 0.0)


def run_load(url, rate, args, seed):
    """The mixed workload at one arrival rate; returns per-request records."""
    records = []
    lock = threading.Lock()
    stop = threading.Event()
    t_end = time.perf_counter() + args.window

    def chat_loop(k):
        n = 0
        while not stop.is_set():
            msgs = [{"role": "user", "content": f"Chat {k}.{n}: tell me a long story about a {WORDS[(k + n) % len(WORDS)]}."}]
            ttft, gaps, ok = stream(url, msgs, args.chat_tokens)
            with lock:
                records.append({"kind": "chat", "ttft": ttft, "gaps": gaps, "ok": ok, "done": time.perf_counter()})
            n += 1

    def long_one(i, tokens):
        msgs = [{"role": "system", "content": document(seed * 1000 + i, tokens)},
                {"role": "user", "content": "Summarize the document in one sentence."}]
        ttft, gaps, ok = stream(url, msgs, args.long_out)
        with lock:
            records.append({"kind": "long", "ttft": ttft, "gaps": gaps, "ok": ok, "done": time.perf_counter()})

    chats = [threading.Thread(target=chat_loop, args=(k,)) for k in range(args.chats)]
    for t in chats:
        t.start()
    rng = random.Random(seed)
    longs = []
    i = 0
    next_at = time.perf_counter() + rng.expovariate(rate)
    while True:
        now = time.perf_counter()
        if next_at >= t_end:
            break
        if now < next_at:
            time.sleep(min(next_at - now, 0.05))
            continue
        t = threading.Thread(target=long_one, args=(i, rng.randint(args.long_min, args.long_max)))
        t.start()
        longs.append(t)
        i += 1
        next_at += rng.expovariate(rate)
    time.sleep(max(0.0, t_end - time.perf_counter()))
    stop.set()
    for t in longs + chats:
        t.join()
    return records


def summarize(records, args, window):
    def good(r):
        return (r["ok"] and r["ttft"] is not None and r["ttft"] <= args.ttft_slo
                and (not r["gaps"] or pct(r["gaps"], 0.99) * 1e3 <= args.itl_slo))

    out = {"requests": len(records), "failed": sum(not r["ok"] for r in records),
           "goodput": sum(good(r) for r in records) / window}
    for kind in ("chat", "long"):
        rs = [r for r in records if r["kind"] == kind and r["ok"]]
        gaps = [g for r in rs for g in r["gaps"]]
        out[kind] = {
            "n": len(rs),
            "good": sum(good(r) for r in rs),
            "ttft_p50": pct([r["ttft"] for r in rs], 0.5), "ttft_p99": pct([r["ttft"] for r in rs], 0.99),
            "itl_p50_ms": pct(gaps, 0.5) * 1e3, "itl_p99_ms": pct(gaps, 0.99) * 1e3,
        }
    return out


def start_setup(name, args, logdir):
    threads = str(args.threads)
    servers = []
    if name == "disaggregated":
        servers.append(lastmile_proc.start(["serve", "--threads", threads, "--role", "prefill", "--internal-token", TOKEN,
                                            "--served-model-name", "m"], log=logdir / "prefill.log"))
        servers.append(lastmile_proc.start(["serve", "--threads", threads, "--role", "decode", "--internal-token", TOKEN,
                                            "--served-model-name", "m"], log=logdir / "decode.log"))
        extra = ["--internal-token", TOKEN, "--disagg-min-tokens", str(args.min_tokens)]
    else:
        for k in range(2):
            servers.append(lastmile_proc.start(["serve", "--threads", threads, "--served-model-name", "m"],
                                               log=logdir / f"worker{k}.log"))
        extra = []
    gw_args = ["gateway", "--policy", "kv_aware", *extra]
    for s in servers:
        gw_args += ["--worker", s.url]
    gateway = lastmile_proc.start(gw_args, log=logdir / f"gateway-{name}.log")
    # Wait until the gateway sees every worker (and their roles).
    deadline = time.time() + 30
    while time.time() < deadline:
        with urllib.request.urlopen(gateway.url + "/metrics", timeout=5) as r:
            page = r.read().decode()
        if len(re.findall(r'^lastmile_gateway_worker_available\{[^}]*\} 1$', page, re.M)) == len(servers):
            break
        time.sleep(0.2)
    return gateway, servers


def svg(results, path, args):
    w, h, left, bottom, top = 720, 360, 60, 50, 30
    rates = sorted({r["rate"] for r in results})
    series = {name: [r for r in results if r["setup"] == name] for name in ("disaggregated", "co-located")}
    colors = {"disaggregated": "#1f77b4", "co-located": "#d62728"}
    panel_w = (w - left - 40) / 2

    def panel(x0, title, key, unit):
        vals = [key(r) for r in results]
        vmax = max([v for v in vals if v == v] + [1e-9]) * 1.15
        px = lambda rate: x0 + (rates.index(rate) + 0.5) * panel_w / len(rates)  # noqa: E731
        py = lambda v: top + (h - top - bottom) * (1 - v / vmax)  # noqa: E731
        out = [f'<text x="{x0 + panel_w / 2}" y="{top - 10}" text-anchor="middle">{title}</text>',
               f'<line x1="{x0}" y1="{h - bottom}" x2="{x0 + panel_w}" y2="{h - bottom}" stroke="#444"/>',
               f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{h - bottom}" stroke="#444"/>']
        for k in range(5):
            v = vmax * k / 4
            out.append(f'<text x="{x0 - 5}" y="{py(v) + 4}" text-anchor="end" font-size="10">{v:.2f}{unit}</text>')
        for rate in rates:
            out.append(f'<text x="{px(rate)}" y="{h - bottom + 15}" text-anchor="middle" font-size="10">{rate}/s</text>')
        for name, rs in series.items():
            pts = " ".join(f"{px(r['rate']):.1f},{py(key(r)):.1f}" for r in rs)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{colors[name]}" stroke-width="2"/>')
            for r in rs:
                out.append(f'<circle cx="{px(r["rate"]):.1f}" cy="{py(key(r)):.1f}" r="3" fill="{colors[name]}"/>')
        return out

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>']
    parts += panel(left, f"goodput, req/s (TTFT &#8804; {args.ttft_slo:g} s, ITL p99 &#8804; {args.itl_slo:g} ms)", lambda r: r["goodput"], "")
    parts += panel(left + panel_w + 50, "chat ITL p99, ms", lambda r: r["chat"]["itl_p99_ms"], "")
    parts.append(f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">long-prompt arrival rate '
                 f'({args.long_min}-{args.long_max} tokens) beside {args.chats} chat streams</text>')
    for k, (name, color) in enumerate(colors.items()):
        parts.append(f'<rect x="{left + 10 + k * 140}" y="{top + 4}" width="12" height="12" fill="{color}"/>')
        parts.append(f'<text x="{left + 26 + k * 140}" y="{top + 14}">{name}</text>')
    parts.append("</svg>")
    Path(path).write_text("\n".join(parts) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="0.1,0.2,0.3", help="long prompts per second, comma-separated")
    ap.add_argument("--window", type=float, default=30, help="seconds of load per rate")
    ap.add_argument("--threads", type=int, default=1, help="threads per worker (two workers either way)")
    ap.add_argument("--chats", type=int, default=4, help="chat streams running all along")
    ap.add_argument("--chat-tokens", type=int, default=96)
    ap.add_argument("--long-min", type=int, default=2000)
    ap.add_argument("--long-max", type=int, default=4000)
    ap.add_argument("--long-out", type=int, default=16)
    ap.add_argument("--min-tokens", type=int, default=512, help="the gateway's --disagg-min-tokens")
    ap.add_argument("--ttft-slo", type=float, default=5.0, help="seconds")
    ap.add_argument("--itl-slo", type=float, default=60.0, help="ms, p99 of each request's gaps")
    ap.add_argument("--json", default=None)
    ap.add_argument("--svg", default=str(ROOT / "docs" / "disagg.svg"))
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    logdir = Path("/tmp/lastmile-bench-disagg")
    logdir.mkdir(parents=True, exist_ok=True)
    results = []
    transfer = {}
    for setup in ("disaggregated", "co-located"):
        gateway, servers = start_setup(setup, args, logdir)
        try:
            for k, rate in enumerate(rates):
                records = run_load(gateway.url, rate, args, seed=k + 1)
                s = summarize(records, args, args.window)
                s.update(setup=setup, rate=rate)
                results.append(s)
                print(f"{setup:>13} rate {rate:.2f}/s: goodput {s['goodput']:.2f} req/s, "
                      f"chat ITL p99 {s['chat']['itl_p99_ms']:.1f} ms, long TTFT p50 {s['long']['ttft_p50']:.2f} s "
                      f"p99 {s['long']['ttft_p99']:.2f} s ({s['long']['n']} long, {s['chat']['n']} chats, {s['failed']} failed)",
                      flush=True)
            if setup == "disaggregated":
                pull = metric_sum(servers[1].url, "lastmile_kv_pull_duration_seconds")
                prefill = metric_sum(gateway.url, "lastmile_gateway_prefill_duration_seconds")
                transfer = {"pull_s_mean": pull[0] / max(pull[1], 1), "prefill_s_mean": prefill[0] / max(prefill[1], 1),
                            "pulls": pull[1]}
        finally:
            gateway.stop()
            for s in servers:
                s.stop()
    print("\n| rate (long/s) | setup | goodput req/s | chat ITL p50 / p99 ms | long TTFT p50 / p99 s | long ITL p99 ms |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['rate']} | {r['setup']} | {r['goodput']:.2f} | {r['chat']['itl_p50_ms']:.1f} / {r['chat']['itl_p99_ms']:.1f} "
              f"| {r['long']['ttft_p50']:.2f} / {r['long']['ttft_p99']:.2f} | {r['long']['itl_p99_ms']:.1f} |")
    for rate in rates:
        d = next(r for r in results if r["rate"] == rate and r["setup"] == "disaggregated")
        c = next(r for r in results if r["rate"] == rate and r["setup"] == "co-located")
        ratio = d["goodput"] / c["goodput"] if c["goodput"] else float("inf")
        print(f"rate {rate}/s: goodput disaggregated / co-located = {ratio:.2f}x")
    if transfer:
        share = transfer["pull_s_mean"] / transfer["prefill_s_mean"] if transfer["prefill_s_mean"] else float("nan")
        print(f"KV pull {transfer['pull_s_mean'] * 1e3:.0f} ms mean over {transfer['pulls']:.0f} pulls vs prefill "
              f"{transfer['prefill_s_mean'] * 1e3:.0f} ms mean: transfer = {share * 100:.1f}% of the prefill time")
        transfer["share_of_prefill"] = share
    svg(results, args.svg, args)
    print(f"plot: {args.svg}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "transfer": transfer, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
