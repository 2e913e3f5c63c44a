#!/usr/bin/env python3
"""Engine throughput, ours against llama.cpp's `llama-bench`, in one run on the same GGUFs and threads.

    python3 scripts/bench_engine.py [--threads 2] [--repeats 5] [--formats Q4_1,Q8_0,Q4_K_M]
                                    [--tier native|avx512|avx-vnni|avx2[,...]] [--model PATH]
                                    [--write BENCHMARKS.md]

--tier measures both engines as a CPU of that instruction-set tier would run them: lastmile with
`--kernels avx2` (or avx512: no AMX) and llama.cpp built for exactly that tier
(LASTMILE_ANCHOR_TIER, its own build folder), so an AVX-512 machine reports what an AVX2-only one
would see. Builds the anchor first if needed (scripts/anchor/build_llama_cpp.sh, ~15 min once per
tier). The default
model is Q4_1; the other formats are made from it with llama.cpp's own
`llama-quantize --allow-requantize` (cached next to it). For each format, runs
`llama-bench -p 512 -n 128` and `lastmile engine-bench --prompt-tokens 512 --gen-tokens 128`
alternately, and prints medians and ratios. Several tiers (`--tier native,avx2`) are measured in
one run, each round taking them in turn, and reported side by side as well as each in its own
table: what lastmile keeps of its lead over llama.cpp on a CPU with fewer instructions. With
--write, replaces each tier's engine section of BENCHMARKS.md (and the side-by-side one).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TIERS = {
    # tier: (lastmile --kernels, anchor build folder, words for the report)
    "native": ("auto", "build", "each engine at its best on this CPU (llama.cpp built with native flags)"),
    "avx512": ("avx512", "build-avx512", "AVX-512 tier, no AMX: lastmile `--kernels avx512`, "
               "llama.cpp built with AVX-512 (VNNI, VBMI, BF16) and without AMX"),
    "avx-vnni": ("avx-vnni", "build-avxvnni", "AVX2 + AVX-VNNI tier, as on an Alder Lake or later Intel client "
                 "CPU: lastmile `--kernels avx-vnni`, llama.cpp built with AVX2/FMA/F16C/AVX-VNNI and every "
                 "AVX-512 option off"),
    "avx2": ("avx2", "build-avx2", "AVX2 tier, as on an AVX2-only CPU: lastmile `--kernels avx2`, "
             "llama.cpp built with AVX2/FMA/F16C and every AVX-512 option off"),
}


def cpu_description():
    """The CPU's model name, caches and widest vector extensions, for the report."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.+)$", info, re.M) or [None, ""])[1].split())
    caches = []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for name in ("L2", "L3"):
            m = re.search(rf"^{name} cache:\s*(.+)$", out, re.M)
            if m:
                caches.append(f"{name} {m.group(1).strip()}")
    except OSError:
        pass
    isa = "AMX" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags else \
        "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model.group(1).strip() if model else 'unknown CPU'}, {os.cpu_count()} vCPUs, " \
           f"{', '.join(caches)}, best ISA {isa}"


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--model", help="GGUF file (default: the default model); with it, --formats is ignored")
    ap.add_argument("--formats", default="Q4_1,Q8_0,Q4_K_M",
                    help="formats of the default model to compare (others are requantized from Q4_1)")
    ap.add_argument("--tier", default="native",
                    help="instruction-set tier(s) both engines run at, comma-separated (" + ", ".join(TIERS)
                         + "); with several, every round runs each tier in turn and a table puts them side by side")
    ap.add_argument("--write", help="update this markdown file's section for each tier (and the side-by-side one)")
    a = ap.parse_args()
    tiers = a.tier.split(",")
    for t in tiers:
        if t not in TIERS:
            ap.error(f"unknown tier {t!r} (one of {', '.join(TIERS)})")

    anchor = Path(os.environ.get("LASTMILE_ANCHOR_DIR", Path.home() / ".cache/lastmile/anchor"))
    bench_bins = {}
    for t in tiers:
        bench_bins[t] = anchor / TIERS[t][1] / "bin/llama-bench"
        if not bench_bins[t].exists():
            subprocess.run(["bash", str(ROOT / "scripts/anchor/build_llama_cpp.sh")], check=True,
                           env={**os.environ, "LASTMILE_ANCHOR_TIER": t})
    ours = ROOT / "target/release/lastmile"
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "lastmile"], check=True, cwd=ROOT)
    default = Path(run([str(ours), "models", "pull"]).strip())
    if a.model:
        models = [Path(a.model)]
    else:
        models = []
        quantize = bench_bins[tiers[0]].parent / "llama-quantize"
        for fmt in a.formats.split(","):
            path = default.with_name(default.name.replace(".Q4_1.", f".{fmt}."))
            if not path.exists():
                print(f"requantizing the default model to {fmt} with llama-quantize ...", file=sys.stderr)
                run([str(quantize), "--allow-requantize", str(default), str(path), fmt, "2"],
                    env={**os.environ, "LD_LIBRARY_PATH": str(quantize.parent)})
            models.append(path)

    # rows[tier] = [(format, measure, lastmile, llama.cpp)]; kernels[tier] = what lastmile reported.
    rows = {t: [] for t in tiers}
    kernels = {t: set() for t in tiers}
    for model in models:
        fmt = model.name.split(".")[-2] if model.name.count(".") >= 2 else model.name
        runs = {t: measure_round_lists() for t in tiers}
        for i in range(a.repeats):
            # The tiers take turns inside each round, so that the host's drift (a third of the read
            # rate within minutes here) falls on all of them alike.
            for t in tiers:
                label = f"{model.name} round {i + 1}/{a.repeats}" + (f" tier {t}" if len(tiers) > 1 else "")
                kernels[t].add(measure_round(runs[t], label, model, a, bench_bins[t], ours, TIERS[t][0]))
        for t in tiers:
            rows[t] += summary_rows(fmt, runs[t], a)

    cmd_base = (f"python3 scripts/bench_engine.py --threads {a.threads} --repeats {a.repeats}"
                f" --prompt-tokens {a.prompt_tokens} --gen-tokens {a.gen_tokens}")
    cmd_tail = f" --model {a.model}" if a.model else f" --formats {a.formats}"
    cmd_all = f"{cmd_base} --tier {a.tier}{cmd_tail}"
    sections = []
    for t in tiers:
        kernels_seen = ", ".join(sorted(kernels[t]))
        sections.append((section_heading(t),
                         tier_section(t, rows[t], kernels_seen, a, f"{cmd_base} --tier {t}{cmd_tail}", cmd_all)))
    if len(tiers) > 1:
        sections.append((SIDE_BY_SIDE_HEADING, side_by_side(tiers, rows, kernels, a, cmd_all)))
    for _, text in sections:
        print(text)
    if a.write:
        path = ROOT / a.write
        for heading, text in sections:
            write_section(path, heading, text)


def measure_round_lists():
    """Per-round measurements of one tier and model."""
    return {"ll_pp": [], "ll_tg": [], "our_pp": [], "our_tg": [], "limits": [], "our_share": [], "ll_share": []}


def measure_round(r, label, model, a, bench_bin, ours, kernels):
    """One round: llama.cpp's `llama-bench`, then lastmile's `engine-bench`; appends to `r`
    and returns the kernels lastmile reported."""
    print(f"{label}: llama.cpp ...", file=sys.stderr, flush=True)
    out = run([str(bench_bin), "-m", str(model), "-t", str(a.threads), "-p", str(a.prompt_tokens),
               "-n", str(a.gen_tokens), "-r", "1", "-o", "json"],
              env={**os.environ, "LD_LIBRARY_PATH": str(bench_bin.parent)})
    for row in json.loads(out):
        (r["ll_pp"] if row["n_prompt"] > 0 else r["ll_tg"]).append(row["avg_ts"])
    print(f"{label}: lastmile ...", file=sys.stderr, flush=True)
    out = run([str(ours), "engine-bench", "--model", str(model), "--threads", str(a.threads),
               "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
               "--repeats", "1", "--json", "--kernels", kernels],
              env={**os.environ, "RUST_LOG": "warn"})
    res = json.loads(out.strip().splitlines()[-1])
    r["our_pp"] += res["prefill_tok_s"]
    r["our_tg"] += res["decode_tok_s"]
    r["limits"].append(res["decode_limit_tok_s"])
    # Each round's decodes against that round's read rate (engine-bench measures it right before
    # and after its own decode; llama.cpp's ran seconds earlier): the rate moves by a third within
    # minutes on a shared host, so a share is taken per round, then the median.
    r["our_share"].append(res["decode_share_of_limit"])
    r["ll_share"].append(r["ll_tg"][-1] / res["decode_limit_tok_s"])
    return res["kernels"]


def summary_rows(fmt, r, a):
    """The medians of one tier and format: (format, measure, lastmile, llama.cpp) rows."""
    med = statistics.median
    limit = med(r["limits"])
    return [
        (fmt, f"prefill {a.prompt_tokens} tokens (tok/s)", med(r["our_pp"]), med(r["ll_pp"])),
        (fmt, f"decode {a.gen_tokens} tokens (tok/s)", med(r["our_tg"]), med(r["ll_tg"])),
        (fmt, f"decode as % of the bandwidth limit (median {limit:.0f} tok/s; "
              f"lastmile's rounds {100 * min(r['our_share']):.0f}–{100 * max(r['our_share']):.0f}%)",
         100 * med(r["our_share"]), 100 * med(r["ll_share"])),
    ]


def method_text(a, rounds_words):
    return (f"Default model in each format, {a.threads} threads, medians of {a.repeats} {rounds_words} "
            "(llama.cpp's `llama-bench` from the llama-cpp-python 0.3.36 sources, same GGUF, same machine, one run). "
            "Q8_0 and Q4_K_M are made from the Q4_1 file by llama.cpp's `llama-quantize --allow-requantize`. "
            "The bandwidth limit is `engine-bench`'s: this machine's measured memory read rate over the "
            "bytes of weights one token reads; the decode share is the median over rounds of each round's "
            "decode against the read rate measured in that round.")


def tier_section(tier, rows, kernels_seen, a, cmd, cmd_all):
    """A tier's section: what ran, the table, how to reproduce it."""
    lines = [
        section_heading(tier),
        "",
        f"**CPU: {cpu_description()}.** Tier: {TIERS[tier][2]}; lastmile's kernels reported: "
        f"`{kernels_seen}`.",
        "",
        method_text(a, "alternating rounds"),
        "",
        "| format | measure | lastmile | llama.cpp | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for fmt, name, ours_v, ll_v in rows:
        lines.append(f"| {fmt} | {name} | {ours_v:.1f} | {ll_v:.1f} | **{ours_v / ll_v:.2f}x** |")
    lines += ["", f"Reproduce: `{cmd}`" + (f" (measured in one run with other tiers: `{cmd_all}`)"
                                          if cmd != cmd_all else ""), ""]
    return "\n".join(lines)


SIDE_BY_SIDE_HEADING = "## Engine: instruction-set tiers side by side"


def side_by_side(tiers, rows, kernels, a, cmd_all):
    """One table with every tier's lastmile, llama.cpp and ratio per measure, from one run whose
    rounds took the tiers in turn: what a user's CPU will see against llama.cpp built for it."""
    head = "| format | measure | " + " | ".join(
        f"{t}: lastmile | {t}: llama.cpp | {t}: ratio" for t in tiers) + " |"
    lines = [
        SIDE_BY_SIDE_HEADING,
        "",
        f"**CPU: {cpu_description()}.** Tiers: " + "; ".join(
            f"`{t}`, {TIERS[t][2]} (lastmile's kernels reported: `{', '.join(sorted(kernels[t]))}`)"
            for t in tiers) + ".",
        "",
        method_text(a, "rounds, each round running every tier in turn"),
        "",
        head,
        "| --- | --- | " + " | ".join("---: | ---: | ---:" for _ in tiers) + " |",
    ]
    for i, (fmt, name, _, _) in enumerate(rows[tiers[0]]):
        # The decode share's words carry per-tier numbers: keep only the measure's name here.
        name = name.split(" (")[0] if name.startswith("decode as %") else name
        cells = []
        for t in tiers:
            _, _, ours_v, ll_v = rows[t][i]
            cells.append(f"{ours_v:.1f} | {ll_v:.1f} | **{ours_v / ll_v:.2f}x**")
        lines.append(f"| {fmt} | {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Reproduce: `{cmd_all}`", ""]
    return "\n".join(lines)


def write_section(path, heading, text):
    """Replaces `heading`'s section of the markdown file at `path` with `text` (its own text, up
    to its first subsection or the next section: the hand-written subsections after it stay), or
    appends it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = old.find(heading + "\n")
    if start < 0:
        path.write_text(old.rstrip() + "\n\n" + text)
        return
    ends = [i for i in (old.find("\n## ", start + 1), old.find("\n### ", start + 1)) if i >= 0]
    rest = old[min(ends) + 1:] if ends else ""
    path.write_text(old[:start] + text + ("\n" + rest if rest else ""))


def section_heading(tier):
    """The BENCHMARKS.md heading of a tier's section (the native one keeps its old name)."""
    if tier == "native":
        return "## Engine: single-stream prefill and decode vs llama.cpp"
    return f"## Engine, {tier.upper()} tier: single-stream prefill and decode vs llama.cpp"


if __name__ == "__main__":
    main()
