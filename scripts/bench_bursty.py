#!/usr/bin/env python3
"""A bursty trace against a deployment that scales to zero, and the same trace against the same
deployment kept warm (the anchor: provisioned replicas, what you pay for without scale to zero).

Trace: idle, then a burst of N streaming chat requests at once, then idle until the scaled
deployment is back at zero. Samples the deployment's replicas (ready, starting, desired) every
100 ms from the admin API, times each request's first token, and reports p50/p90 time to first
token and replica-seconds (what the replicas cost) for both, in one run. Draws the replicas over
time and each request's TTFT as an SVG.

    python3 scripts/bench_bursty.py [--burst 64] [--max-replicas 2] [--threads 1] [--svg docs/bursty.svg]

Needs `cargo build --release` and the default model on disk (`lastmile models pull`).
"""

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import lastmile_proc  # scripts/lastmile_proc.py: starts servers on ports they report

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def ttft(url, i, t0):
    """One streaming request; returns (sent at, seconds to first content, ok)."""
    body = json.dumps({"model": "m", "max_tokens": 32, "temperature": 0, "stream": True, "ignore_eos": True,
                       "messages": [{"role": "user", "content": f"Tell me fact number {i} about the sea."}]}).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    sent = time.perf_counter()
    first = None
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                line = line.decode().strip()
                if first is None and line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                    first = time.perf_counter() - sent
        return sent - t0, first, first is not None
    except OSError:
        return sent - t0, None, False


def run_trace(name, min_replicas, args, workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.yaml"
    config.write_text(
        "deployments:\n  - name: m\n"
        f"    min_replicas: {min_replicas}\n    max_replicas: {args.max_replicas}\n"
        f"    threads: {args.threads}\n    target_concurrency: {args.target}\n    idle_timeout: {args.idle}s\n"
        "    autoscaling:\n      stable_window: 10s\n      panic_window: 1s\n"
    )
    server = lastmile_proc.start(["serve", "--config", config, "--usage-db", workdir / f"{name}.db"],
                                 log=workdir / f"{name}.log", binary=BIN)
    url = server.url
    samples = []
    try:
        while True:
            try:
                s = get_json(f"{url}/admin/deployments/m")["status"]
                if s["ready"] >= min_replicas:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        t0 = time.perf_counter()
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                s = get_json(f"{url}/admin/deployments/m")["status"]
                samples.append((time.perf_counter() - t0, s["ready"], s["starting"], s["desired"]))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        time.sleep(args.lead)
        results = [None] * args.burst
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ttft(url, i, t0)))
                   for i in range(args.burst)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        burst_end = time.perf_counter() - t0
        # Idle until the scaled deployment is back at zero (or the tail for the warm one).
        deadline = time.perf_counter() + args.idle + 20
        while time.perf_counter() < deadline:
            s = samples[-1] if samples else None
            if min_replicas == 0 and s and s[1] == 0 and s[2] == 0 and time.perf_counter() - t0 > burst_end + 1:
                break
            if min_replicas > 0 and time.perf_counter() - t0 > burst_end + args.idle + 3:
                break
            time.sleep(0.2)
        time.sleep(1)
        stop.set()
        sampler.join()
    finally:
        server.stop()
    ok = [r for r in results if r[2]]
    firsts = sorted(r[1] for r in ok)
    p = lambda q: firsts[min(len(firsts) - 1, int(q * len(firsts)))]  # noqa: E731
    return {
        "name": name, "samples": samples, "results": results, "ok": len(ok),
        "p50": p(0.5), "p90": p(0.9), "duration": samples[-1][0],
    }


def replica_seconds(samples, horizon):
    """Replicas (ready + starting) integrated over time, up to `horizon` seconds."""
    return sum((min(b[0], horizon) - a[0]) * (a[1] + a[2])
               for a, b in zip(samples, samples[1:]) if a[0] < horizon)


def svg(runs, path, args):
    w, h, left, top, gap, ph = 760, 430, 60, 30, 50, 150
    tmax = max(r["duration"] for r in runs)
    ymax = args.max_replicas
    fmax = max(max((x[1] or 0) for x in r["results"]) for r in runs) * 1.1
    x = lambda t: left + (w - left - 20) * t / tmax  # noqa: E731
    colors = {runs[0]["name"]: "#d62728", runs[1]["name"]: "#1f77b4"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="18" font-weight="bold">Bursty trace: idle, {args.burst} requests at once, idle '
           f'(replicas over time; each request\'s time to first token)</text>']
    # Panel 1: replicas (ready + starting).
    y1 = lambda v: top + ph - ph * v / ymax  # noqa: E731
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{w - 20}" y2="{top + ph}" stroke="black"/>')
    for v in range(ymax + 1):
        out.append(f'<text x="{left - 8}" y="{y1(v) + 4}" text-anchor="end">{v}</text>')
        out.append(f'<line x1="{left}" y1="{y1(v)}" x2="{w - 20}" y2="{y1(v)}" stroke="#eee"/>')
    out.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})" text-anchor="middle">'
               'replicas (ready + starting)</text>')
    for r in runs:
        pts = " ".join(f"{x(t):.1f},{y1(a + b):.1f}" for t, a, b, _ in r["samples"])
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colors[r["name"]]}" stroke-width="2"/>')
    # Panel 2: TTFT per request, by send time.
    top2 = top + ph + gap
    y2 = lambda v: top2 + ph - ph * v / fmax  # noqa: E731
    out.append(f'<line x1="{left}" y1="{top2 + ph}" x2="{w - 20}" y2="{top2 + ph}" stroke="black"/>')
    for k in range(5):
        v = fmax * k / 4
        out.append(f'<text x="{left - 8}" y="{y2(v) + 4}" text-anchor="end">{v:.1f}</text>')
    out.append(f'<text x="14" y="{top2 + ph / 2}" transform="rotate(-90 14 {top2 + ph / 2})" text-anchor="middle">'
               'TTFT (s)</text>')
    for r in runs:
        for sent, first, ok in r["results"]:
            if ok:
                out.append(f'<circle cx="{x(sent):.1f}" cy="{y2(first):.1f}" r="2.5" fill="{colors[r["name"]]}" '
                           'fill-opacity="0.6"/>')
    for k in range(6):
        t = tmax * k / 5
        out.append(f'<text x="{x(t):.1f}" y="{top2 + ph + 16}" text-anchor="middle">{t:.0f} s</text>')
    for i, r in enumerate(runs):
        y = h - 28 + 14 * i
        out.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" fill="{colors[r["name"]]}"/>')
        out.append(f'<text x="{left + 16}" y="{y}">{r["name"]}: p90 TTFT {r["p90"]:.2f} s, '
                   f'{r["replica_seconds"]:.0f} replica-seconds</text>')
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=64)
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="compute threads per replica")
    ap.add_argument("--target", type=float, default=8, help="target concurrency per replica")
    ap.add_argument("--idle", type=float, default=5, help="idle seconds before scale to zero")
    ap.add_argument("--lead", type=float, default=3, help="idle seconds before the burst")
    ap.add_argument("--svg", default=str(ROOT / "docs" / "bursty.svg"))
    args = ap.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"lastmile-bursty-{os.getpid()}"
    runs = [run_trace("scale to zero (min 0)", 0, args, work),
            run_trace(f"always warm (min {args.max_replicas})", args.max_replicas, args, work)]
    horizon = runs[0]["duration"]
    for r in runs:
        r["replica_seconds"] = replica_seconds(r["samples"], horizon)
    svg(runs, args.svg, args)
    print(f"| deployment | requests ok | p50 TTFT (s) | p90 TTFT (s) | replica-seconds over {runs[0]['duration']:.0f} s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in runs:
        print(f"| {r['name']} | {r['ok']}/{args.burst} | {r['p50']:.2f} | {r['p90']:.2f} | {r['replica_seconds']:.0f} |")
    a, b = runs
    print(f"\nscale to zero: p90 TTFT {a['p90'] / b['p90']:.2f}x the warm deployment's, "
          f"{a['replica_seconds'] / b['replica_seconds']:.2f}x its replica-seconds; plot: {args.svg}")


if __name__ == "__main__":
    main()
