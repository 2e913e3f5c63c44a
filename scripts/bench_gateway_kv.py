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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sandbox import cpu_line, pct, progress, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"
MODEL = "smollm2-135m-instruct"
WORDS = ["river", "stone", "market", "lantern", "harbor", "meadow", "signal", "copper", "orchard"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, log):
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(port, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{' '.join(map(str, proc.args))} exited early (see its log)")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"port {port} never became healthy")


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
        for le, n in buckets:
            if n >= p * total:
                return le * 1e3
        return float("nan")

    return q(0.5), q(0.99), total


def run(binary, label, args, log):
    wport, gport = free_port(), free_port()
    worker = start([binary, "serve", "--port", str(wport), "--threads", str(args.threads)], log)
    procs = [worker]
    try:
        wait_healthy(wport, worker)
        gw = start([binary, "gateway", "--port", str(gport), "--policy", "kv_aware",
                    "--worker", f"http://127.0.0.1:{wport}"], log)
        procs.append(gw)
        wait_healthy(gport, gw)
        direct = http.client.HTTPConnection("127.0.0.1", wport, timeout=120)
        via = http.client.HTTPConnection("127.0.0.1", gport, timeout=120)
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
        h50, h99, n = overhead_histogram(gport)
        return {"direct": d, "gateway": g, "hist_p50": h50, "hist_p99": h99, "hist_n": n}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=80, help="requests each way per binary")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="worker threads")
    ap.add_argument("--before", help="an older lastmile binary to measure first (e.g. before a change)")
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
            runs.append((args.before_label, run(args.before, "before", args, log)))
        runs.append((args.after_label, run(str(BIN), "after", args, log)))
    rows = []
    for name, r in runs:
        d50, g50 = statistics.median(r["direct"]), statistics.median(r["gateway"])
        d99, g99 = pct(r["direct"], 99), pct(r["gateway"], 99)
        rows.append(
            f"| {name} | {d50:.2f} / {d99:.2f} | {g50:.2f} / {g99:.2f} | **{g50 - d50:+.2f} ms** "
            f"| {g50 / d50:.3f}x | ≤ {r['hist_p50']:.2f} / ≤ {r['hist_p99']:.2f} |"
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
        f"gateway. {cpu_line()}. Latencies end to end in ms.",
        "",
        "| build | direct p50 / p99 | through the gateway p50 / p99 | **overhead p50** | ratio | gateway's own histogram p50 / p99 (bucket bound) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ])
    write_section(section, "## Gateway overhead with kv_aware routing", None if args.no_write else ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
