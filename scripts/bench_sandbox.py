#!/usr/bin/env python3
"""Sandbox start-up, measured the way an agent meets it: create a sandbox, run `echo`, time to
its first output. Beside it, in the same run and on the same machine, the anchor: a bare
`bwrap --unshare-all ... true` (what any namespace sandbox pays at least), and E2B's stated
~150 ms to start a sandbox.

Three measures:
1. create -> first output of a first command, N times (sandboxes killed after each), over
   plain HTTP: `POST /v2/sandboxes`, then `process.Process/Start` until the first stdout
   event. Median, p90, p99.
2. The same through the official `e2b` SDK (`Sandbox.create()` + `commands.run("echo")`, the
   SDK's own overhead included), fewer times.
3. 100 sandboxes alive at once: create latency as they pile up, then memory per sandbox (PSS of the
   host processes of the sandbox user, plus the growth of lastmile itself) and memory charged to
   their cgroups.

    python3 scripts/bench_sandbox.py [--runs 100] [--alive 100] [--write BENCHMARKS.md]

Needs `cargo build --release` and bubblewrap; the `e2b` package for measure 2 (skipped
without it).
"""

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import lastmile_proc  # scripts/lastmile_proc.py: starts servers on ports they report

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "lastmile"
SANDBOX_UID = 65534


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def progress(i, n, what):
    width = 30
    done = int(width * i / n)
    sys.stderr.write(f"\r{what} [{'#' * done}{'.' * (width - done)}] {i}/{n}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def cpu_line():
    model = "unknown CPU"
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    tier = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "baseline")
    l3 = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"L3 cache:\s*(.+)", out)
        l3 = f", L3 {m.group(1).strip()}" if m else ""
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} vCPUs{l3}, {tier}), Linux {platform.release()}"


class Server:
    """`lastmile sandbox EXTRA` on a port it reports (its log in the temp folder)."""

    def __init__(self, extra):
        self.server = lastmile_proc.start(["sandbox", *extra], binary=BIN, timeout=30)
        self.proc = self.server.proc
        self.url = self.server.url
        self.port = self.server.port

    def stop(self):
        self.server.stop()


def create(conn):
    body = json.dumps({"templateID": "base", "timeout": 600})
    conn.request("POST", "/v2/sandboxes", body, {"content-type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    if r.status != 201:
        raise RuntimeError(f"create: {r.status} {data}")
    return data["sandboxID"], data["envdAccessToken"]


def kill(conn, sid):
    conn.request("DELETE", f"/sandboxes/{sid}")
    r = conn.getresponse()
    r.read()


def first_output(port, sid, token, cmd="echo hello"):
    """Starts `cmd` and returns when its first stdout event arrives."""
    msg = json.dumps({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}}).encode()
    body = struct.pack(">BI", 0, len(msg)) + msg
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request(
        "POST",
        "/process.Process/Start",
        body,
        {
            "content-type": "application/connect+json",
            "connect-protocol-version": "1",
            "e2b-sandbox-id": sid,
            "e2b-sandbox-port": "49983",
            "x-access-token": token,
        },
    )
    r = c.getresponse()
    buf = b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            raise RuntimeError("stream ended without output")
        buf += chunk
        while len(buf) >= 5:
            flags, n = struct.unpack(">BI", buf[:5])
            if len(buf) < 5 + n:
                break
            m = json.loads(buf[5 : 5 + n])
            buf = buf[5 + n :]
            if flags & 2:
                raise RuntimeError(f"stream ended: {m}")
            if "data" in m.get("event", {}):
                c.close()
                return


def bare_bwrap(runs):
    """The anchor: bubblewrap's own start, nothing inside but `true`."""
    args = [
        "bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--proc", "/proc", "--dev", "/dev", "--", "/usr/bin/true",
    ]
    out = []
    for i in range(runs):
        t = time.perf_counter()
        subprocess.run(args, check=True)
        out.append((time.perf_counter() - t) * 1e3)
        progress(i + 1, runs, "bwrap ... true        ")
    return out


def measure_http(server, runs):
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    out = []
    for i in range(runs):
        t = time.perf_counter()
        sid, token = create(conn)
        first_output(server.port, sid, token)
        out.append((time.perf_counter() - t) * 1e3)
        kill(conn, sid)
        progress(i + 1, runs, "create -> first output")
    return out


def measure_sdk(server, runs):
    try:
        import e2b  # noqa: F401
    except ImportError:
        return None
    os.environ["E2B_API_URL"] = server.url
    os.environ["E2B_SANDBOX_URL"] = server.url
    os.environ["E2B_API_KEY"] = "unused"
    from e2b import Sandbox

    Sandbox.create().kill()  # the SDK's own first-use setup is not a sandbox's cost
    out = []
    for i in range(runs):
        t = time.perf_counter()
        sb = Sandbox.create()
        sb.commands.run("echo hello")
        out.append((time.perf_counter() - t) * 1e3)
        sb.kill()
        progress(i + 1, runs, "e2b SDK create + run  ")
    return out


def pss_kib(pids):
    """Proportional set size: shared pages (the binary's text, libraries) divided among the
    processes sharing them, so that a sum over processes counts each page once."""
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def pids_of_uid(uid):
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            out.append(int(pid))
                        break
            except OSError:
                pass
    return out


def measure_alive(server, n):
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    base_rss = pss_kib([server.proc.pid])
    base_sandbox_procs = len(pids_of_uid(SANDBOX_UID))
    lat = []
    ids = []
    for i in range(n):
        t = time.perf_counter()
        sid, token = create(conn)
        first_output(server.port, sid, token)
        lat.append((time.perf_counter() - t) * 1e3)
        ids.append(sid)
        progress(i + 1, n, f"{n} alive at once      ")
    time.sleep(0.5)
    procs = pids_of_uid(SANDBOX_UID)
    sandbox_rss = pss_kib(procs)
    lastmile_growth = pss_kib([server.proc.pid]) - base_rss
    conn.request("GET", "/admin/sandboxes")
    listed = json.loads(conn.getresponse().read())["sandboxes"]
    charged = [s["memoryUsedBytes"] for s in listed if s.get("memoryUsedBytes") is not None]
    for sid in ids:
        kill(conn, sid)
    return {
        "latency": lat,
        "processes": len(procs) - base_sandbox_procs,
        "rss_per_sandbox_kib": (sandbox_rss + max(lastmile_growth, 0)) / n,
        "lastmile_growth_kib": lastmile_growth,
        "cgroup_mib_median": statistics.median(charged) / 2**20 if charged else None,
        "alive": len(listed),
    }


def write_section(section, heading, path):
    """Prints `section`, and with `path` puts it in that Markdown file in place of the section
    whose heading starts with `heading` (appended when there is none)."""
    print("\n" + section)
    if not path:
        return
    bench = Path(path)
    text = bench.read_text()
    pattern = re.compile(re.escape(heading) + r".*?(?=\n## |\Z)", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip() + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    bench.write_text(text)
    print(f"updated {bench}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100, help="create -> first output samples")
    ap.add_argument("--sdk-runs", type=int, default=20, help="samples through the e2b SDK")
    ap.add_argument("--alive", type=int, default=100, help="sandboxes alive at once")
    ap.add_argument("--write", metavar="BENCHMARKS.md", help="replace the Sandboxes section of this file")
    args = ap.parse_args()
    if not shutil.which("bwrap"):
        sys.exit("needs bubblewrap (apt-get install bubblewrap)")
    bare = bare_bwrap(args.runs)
    server = Server(["--sandbox-max-per-key", str(args.alive + 10), "--sandbox-key-cpus", "10000",
                     "--sandbox-key-memory-mib", "100000000"])
    try:
        warm = http.client.HTTPConnection("127.0.0.1", server.port)
        kill(warm, create(warm)[0])  # warm: page cache, first cgroup
        http_ms = measure_http(server, args.runs)
        sdk_ms = measure_sdk(server, args.sdk_runs)
        alive = measure_alive(server, args.alive)
    finally:
        server.stop()

    def row(name, xs):
        return f"| {name} | {len(xs)} | {statistics.median(xs):.1f} | {pct(xs, 90):.1f} | {pct(xs, 99):.1f} |"

    p50, p99 = statistics.median(http_ms), pct(http_ms, 99)
    lines = [
        "## Sandboxes: create to first output (bwrap backend)",
        "",
        f"Machine: {cpu_line()}. One run; milliseconds; both sides measured in the same run.",
        "",
        "| measure | n | median | p90 | p99 |",
        "| --- | --- | --- | --- | --- |",
        row("lastmile: create -> first output of `echo` (HTTP)", http_ms),
    ]
    if sdk_ms:
        lines.append(row("lastmile through the `e2b` SDK: `Sandbox.create()` + `commands.run`", sdk_ms))
    lines += [
        row("anchor: bare `bwrap --unshare-all ... true`", bare),
        row(f"lastmile: create -> first output while {args.alive} sandboxes pile up", alive["latency"]),
        "",
        f"- Target p50 < 50 ms, p99 < 150 ms: **p50 {p50:.1f} ms, p99 {p99:.1f} ms** "
        f"({'met' if p50 < 50 and p99 < 150 else 'missed'}).",
        f"- Against E2B's stated ~150 ms to start a sandbox: **{150 / p50:.1f}x** faster at the median "
        f"(and to a first output, not just a start).",
        f"- Against a bare `bwrap ... true` in this run: {p50 / statistics.median(bare):.2f}x its median "
        "(the rest is the cgroup, the seccomp filter, tmpfs mounts, the agent's exec and the "
        "command's own `bash -l`).",
        f"- {alive['alive']} sandboxes alive at once: {alive['processes']} host processes, "
        f"**{alive['rss_per_sandbox_kib'] / 1024:.2f} MiB of memory (PSS) per sandbox** (bubblewrap, agent and "
        f"lastmile's own growth, here {alive['lastmile_growth_kib'] / 1024:.1f} MiB and counted as 0 when "
        f"negative — its binary's pages are then shared with the agents — divided by {args.alive}); memory charged to each sandbox's cgroup: median "
        f"{alive['cgroup_mib_median']:.2f} MiB.",
        "",
        "Reproduce: `python3 scripts/bench_sandbox.py --write BENCHMARKS.md`",
        "",
    ]
    write_section("\n".join(lines), "## Sandboxes: ", args.write)


if __name__ == "__main__":
    main()
