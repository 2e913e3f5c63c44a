#!/usr/bin/env python3
"""What a kv_aware gateway adds to a request, with a real worker behind it (not a fake one):
the same chat requests (a ~400-token prompt, 1 token out, greedy) sent one at a time straight to
a `lastmile serve` worker and through `lastmile gateway --policy kv_aware` in front of it,
alternating. Each binary given runs its own worker and gateway, in turn, in one run, so that a
build from before a change and one after it are compared on the same machine.

Overhead = p50 through the gateway - p50 direct (end-to-end latency); the gateway's own histogram
(`lastmile_gateway_overhead_seconds`: its time minus the time waiting for the worker) is shown
beside it. Writes BENCHMARKS.md (section "Gateway overhead with kv_aware routing").

    python3 scripts/bench_gateway_kv.py [--requests 80] [--before OLD_BINARY] [--no-write]

Needs `cargo build --release` first. Takes about a minute per binary.
"""

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sandbox import cpu_line, pct, progress, write_section  # noqa: E402
from lastmile_proc import Server, free_port_for_foreign_server, start  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"
MODEL = "smollm2-135m-instruct"
WORDS = ["river", "stone", "market", "lantern", "harbor", "meadow", "signal", "copper", "orchard"]


def launch(binary, args, log, legacy):
    """`binary ARGS` started and healthy. A `legacy` build (from before servers reported the
    port they bound) gets a port picked here instead."""
    if legacy:
        port = free_port_for_foreign_server()
        proc = subprocess.Popen([binary, *args, "--port", str(port)], stdout=log, stderr=log)
        server = Server(proc, f"http://127.0.0.1:{port}", log.name)
    else:
        server = start(args, log=log.name, binary=binary)
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.proc.poll() is not None:
            sys.exit(f"{binary} {' '.join(args)} exited early (see {log.name})")
        try:
            c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{server.url} never became healthy")


def body(i, tag):
    # A different prompt every time (no prefix-cache hits past the template's first block), all
    # of about the same length.
    words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(300))
    return json.dumps({
        "model": MODEL,
        "max_tokens": 1,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": f"Request {tag}-{i}. Remember these words: {words}."},
            {"role": "user", "content": "Say one word."},
        ],
    })


def timed_post(conn, payload):
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", payload, {"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    took = time.perf_counter() - t
    if r.status != 200:
        sys.exit(f"HTTP {r.status}: {data[:300]!r}")
    return took * 1e3


def overhead_histogram(port):
    """(p50 bucket bound ms, p99 bucket bound ms, count) of the gateway's overhead histogram."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/metrics")
    page = c.getresponse().read().decode()
    buckets = []
    for m in re.finditer(r'lastmile_gateway_overhead_seconds_bucket\{le="([^"]+)"\} (\d+)', page):
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        buckets.append((le, int(m.group(2))))
    total = buckets[-1][1] if buckets else 0

    def q(p):
        # Linear inside the bucket that holds the rank, as Prometheus' histogram_quantile.
        lo, below = 0.0, 0
        for le, n in buckets:
            if n >= p * total and n > below:
                if le == float("inf"):
                    return lo * 1e3
                return (lo + (le - lo) * (p * total - below) / (n - below)) * 1e3
            lo, below = le, n
        return float("nan")

    return q(0.5), q(0.99), total


def run(binary, label, args, log, legacy=False):
    servers = []
    try:
        worker = launch(binary, ["serve", "--threads", str(args.threads)], log, legacy)
        servers.append(worker)
        gw = launch(binary, ["gateway", "--policy", "kv_aware", "--worker", worker.url], log, legacy)
        servers.append(gw)
        direct = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=120)
        via = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
        for i in range(args.warmup):
            timed_post(direct, body(i, f"{label}-warm-d"))
            timed_post(via, body(i, f"{label}-warm-g"))
        d, g = [], []
        for i in range(args.requests):
            # Alternate which goes first, so that neither side always follows the other.
            if i % 2:
                d.append(timed_post(direct, body(i, f"{label}-d")))
                g.append(timed_post(via, body(i, f"{label}-g")))
            else:
                g.append(timed_post(via, body(i, f"{label}-g")))
                d.append(timed_post(direct, body(i, f"{label}-d")))
            progress(i + 1, args.requests, f"{label}: direct / through the gateway")
        h50, h99, n = overhead_histogram(gw.port)
        diffs = [b - a for a, b in zip(d, g)]
        return {"direct": d, "gateway": g, "diffs": diffs, "hist_p50": h50, "hist_p99": h99, "hist_n": n}
    finally:
        for s in servers:
            s.stop(timeout=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=80, help="requests each way per binary")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="worker threads")
    ap.add_argument("--before", help="an older lastmile binary to measure first (e.g. before a change)")
    ap.add_argument("--before-legacy", action="store_true",
                    help="the older binary does not report the port it binds (pick one for it)")
    ap.add_argument("--before-label", default="before", help="its row's name")
    ap.add_argument("--after-label", default="this build", help="the current build's row name")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit("build first: cargo build --release")
    runs = []
    with tempfile.NamedTemporaryFile("w", prefix="bench_gateway_kv-", suffix=".log", delete=False) as log:
        print(f"server logs: {log.name}", flush=True)
        if args.before:
            runs.append((args.before_label, run(args.before, "before", args, log, args.before_legacy)))
        runs.append((args.after_label, run(str(BIN), "after", args, log)))
    rows = []
    for name, r in runs:
        d50, g50 = statistics.median(r["direct"]), statistics.median(r["gateway"])
        d99, g99 = pct(r["direct"], 99), pct(r["gateway"], 99)
        rows.append(
            f"| {name} | {d50:.1f} / {d99:.1f} | {g50:.1f} / {g99:.1f} "
            f"| {statistics.median(r['diffs']):+.2f} | {g50 / d50:.3f}x "
            f"| **{r['hist_p50']:.3f}** / {r['hist_p99']:.3f} |"
        )
    argv = " ".join(sys.argv[1:])
    section = "\n".join([
        "## Gateway overhead with kv_aware routing (real worker)",
        "",
        f"`python3 scripts/bench_gateway_kv.py {argv}`".replace(" `", "`"),
        "",
        f"One `lastmile serve --threads {args.threads}` worker and `lastmile gateway --policy kv_aware` "
        f"in front of it; {args.requests} chat requests each way (a ~400-token prompt, different "
        "every time, 1 token out, greedy), one at a time, alternating direct and through the "
        f"gateway. {cpu_line()}. Latencies end to end in ms; the gateway's own time "
        "(`lastmile_gateway_overhead_seconds`: its time minus the wait for the worker's answer, "
        "interpolated in the histogram's buckets) includes building and hashing the prompt.",
        "",
        "| build | direct p50 / p99 | through the gateway p50 / p99 | median of paired differences | ratio of p50s | **gateway's own time p50** / p99 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ])
    write_section(section, "## Gateway overhead with kv_aware routing", None if args.no_write else ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
