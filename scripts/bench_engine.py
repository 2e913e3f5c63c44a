#!/usr/bin/env python3
"""Engine throughput, ours against llama.cpp's `llama-bench`, in one run on the same GGUFs and threads.

    python3 scripts/bench_engine.py [--threads 2] [--repeats 5] [--formats Q4_1,Q8_0,Q4_K_M]
                                    [--tier native|avx512|avx-vnni|avx2] [--model PATH] [--write BENCHMARKS.md]

--tier measures both engines as a CPU of that instruction-set tier would run them: lastmile with
`--kernels avx2` (or avx512: no AMX) and llama.cpp built for exactly that tier
(LASTMILE_ANCHOR_TIER, its own build folder), so an AVX-512 machine reports what an AVX2-only one
would see. Builds the anchor first if needed (scripts/anchor/build_llama_cpp.sh, ~15 min once per
tier). The default
model is Q4_1; the other formats are made from it with llama.cpp's own
`llama-quantize --allow-requantize` (cached next to it). For each format, runs
`llama-bench -p 512 -n 128` and `lastmile engine-bench --prompt-tokens 512 --gen-tokens 128`
alternately, and prints medians and ratios. With --write, replaces the engine section of
BENCHMARKS.md.
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
    ap.add_argument("--tier", choices=list(TIERS), default="native",
                    help="instruction-set tier both engines run at (see above)")
    ap.add_argument("--write", help="update this markdown file's section for the tier")
    a = ap.parse_args()
    kernels, build_dir, tier_words = TIERS[a.tier]

    anchor = Path(os.environ.get("LASTMILE_ANCHOR_DIR", Path.home() / ".cache/lastmile/anchor"))
    bench_bin = anchor / build_dir / "bin/llama-bench"
    if not bench_bin.exists():
        subprocess.run(["bash", str(ROOT / "scripts/anchor/build_llama_cpp.sh")], check=True,
                       env={**os.environ, "LASTMILE_ANCHOR_TIER": a.tier})
    ours = ROOT / "target/release/lastmile"
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "lastmile"], check=True, cwd=ROOT)
    default = Path(run([str(ours), "models", "pull"]).strip())
    if a.model:
        models = [Path(a.model)]
    else:
        models = []
        for fmt in a.formats.split(","):
            path = default.with_name(default.name.replace(".Q4_1.", f".{fmt}."))
            if not path.exists():
                print(f"requantizing the default model to {fmt} with llama-quantize ...", file=sys.stderr)
                run([str(bench_bin.parent / "llama-quantize"), "--allow-requantize", str(default), str(path), fmt, "2"],
                    env={**os.environ, "LD_LIBRARY_PATH": str(bench_bin.parent)})
            models.append(path)

    med = statistics.median
    rows = []
    for model in models:
        ll_pp, ll_tg, our_pp, our_tg, limits, tiers = [], [], [], [], [], set()
        # Each round's decodes against that round's read rate (engine-bench measures it right
        # before and after its own decode; llama.cpp's ran seconds earlier): the rate moves by a
        # third within minutes on a shared host, so a share is taken per round, then the median.
        our_share, ll_share = [], []
        for i in range(a.repeats):
            print(f"{model.name} round {i + 1}/{a.repeats}: llama.cpp ...", file=sys.stderr, flush=True)
            out = run([str(bench_bin), "-m", str(model), "-t", str(a.threads), "-p", str(a.prompt_tokens),
                       "-n", str(a.gen_tokens), "-r", "1", "-o", "json"],
                      env={**os.environ, "LD_LIBRARY_PATH": str(bench_bin.parent)})
            for row in json.loads(out):
                (ll_pp if row["n_prompt"] > 0 else ll_tg).append(row["avg_ts"])
            print(f"{model.name} round {i + 1}/{a.repeats}: lastmile ...", file=sys.stderr, flush=True)
            out = run([str(ours), "engine-bench", "--model", str(model), "--threads", str(a.threads),
                       "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens),
                       "--repeats", "1", "--json", "--kernels", kernels],
                      env={**os.environ, "RUST_LOG": "warn"})
            r = json.loads(out.strip().splitlines()[-1])
            our_pp += r["prefill_tok_s"]
            our_tg += r["decode_tok_s"]
            limits.append(r["decode_limit_tok_s"])
            our_share.append(r["decode_share_of_limit"])
            ll_share.append(ll_tg[-1] / r["decode_limit_tok_s"])
            tiers.add(r["kernels"])
        fmt = model.name.split(".")[-2] if model.name.count(".") >= 2 else model.name
        rows.append((fmt, f"prefill {a.prompt_tokens} tokens (tok/s)", med(our_pp), med(ll_pp)))
        rows.append((fmt, f"decode {a.gen_tokens} tokens (tok/s)", med(our_tg), med(ll_tg)))
        limit = med(limits)
        rows.append((fmt, f"decode as % of the bandwidth limit (median {limit:.0f} tok/s; "
                          f"lastmile's rounds {100 * min(our_share):.0f}–{100 * max(our_share):.0f}%)",
                     100 * med(our_share), 100 * med(ll_share)))
        kernels_seen = ", ".join(sorted(tiers))

    cmd = (f"python3 scripts/bench_engine.py --threads {a.threads} --repeats {a.repeats}"
           f" --prompt-tokens {a.prompt_tokens} --gen-tokens {a.gen_tokens} --tier {a.tier}")
    if a.model:
        cmd += f" --model {a.model}"
    else:
        cmd += f" --formats {a.formats}"
    heading = section_heading(a.tier)
    lines = [
        heading,
        "",
        f"**CPU: {cpu_description()}.** Tier: {tier_words}; lastmile's kernels reported: "
        f"`{kernels_seen}`.",
        "",
        f"Default model in each format, {a.threads} threads, medians of {a.repeats} alternating rounds "
        "(llama.cpp's `llama-bench` from the llama-cpp-python 0.3.36 sources, same GGUF, same machine, one run). "
        "Q8_0 and Q4_K_M are made from the Q4_1 file by llama.cpp's `llama-quantize --allow-requantize`. "
        "The bandwidth limit is `engine-bench`'s: this machine's measured memory read rate over the "
        "bytes of weights one token reads; the decode share is the median over rounds of each round's "
        "decode against the read rate measured in that round.",
        "",
        "| format | measure | lastmile | llama.cpp | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for fmt, name, ours_v, ll_v in rows:
        lines.append(f"| {fmt} | {name} | {ours_v:.1f} | {ll_v:.1f} | **{ours_v / ll_v:.2f}x** |")
    lines += [
        "",
        f"Reproduce: `{cmd}`",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        path = ROOT / a.write
        old = path.read_text() if path.exists() else "# Benchmarks\n\n"
        start = old.find(heading)
        if start < 0:
            path.write_text(old.rstrip() + "\n\n" + text)
            return
        # Replace the section's own text, up to its first subsection or the next section (the
        # hand-written subsections after it stay).
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
