#!/usr/bin/env python3
"""Engine throughput, ours against llama.cpp's `llama-bench`, in one run on the same GGUFs and threads.

    python3 scripts/bench_engine.py [--threads 2] [--repeats 5] [--formats Q4_1,Q8_0,Q4_K_M]
                                    [--model PATH] [--write BENCHMARKS.md]

Builds the anchor first if needed (scripts/anchor/build_llama_cpp.sh, ~15 min once). The default
model is Q4_1; the other formats are made from it with llama.cpp's own
`llama-quantize --allow-requantize` (cached next to it). For each format, runs
`llama-bench -p 512 -n 128` and `lastmile engine-bench --prompt-tokens 512 --gen-tokens 128`
alternately, and prints medians and ratios. With --write, replaces the engine section of
BENCHMARKS.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    ap.add_argument("--write", help="update this markdown file's engine section")
    a = ap.parse_args()

    anchor = Path(os.environ.get("LASTMILE_ANCHOR_DIR", Path.home() / ".cache/lastmile/anchor"))
    bench_bin = anchor / "build/bin/llama-bench"
    if not bench_bin.exists():
        subprocess.run(["bash", str(ROOT / "scripts/anchor/build_llama_cpp.sh")], check=True)
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
        ll_pp, ll_tg, our_pp, our_tg = [], [], [], []
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
                       "--repeats", "1", "--json"], env={**os.environ, "RUST_LOG": "warn"})
            r = json.loads(out.strip().splitlines()[-1])
            our_pp += r["prefill_tok_s"]
            our_tg += r["decode_tok_s"]
        fmt = model.name.split(".")[-2] if model.name.count(".") >= 2 else model.name
        rows.append((fmt, f"prefill {a.prompt_tokens} tokens (tok/s)", med(our_pp), med(ll_pp)))
        rows.append((fmt, f"decode {a.gen_tokens} tokens (tok/s)", med(our_tg), med(ll_tg)))

    cmd = (f"python3 scripts/bench_engine.py --threads {a.threads} --repeats {a.repeats}"
           f" --prompt-tokens {a.prompt_tokens} --gen-tokens {a.gen_tokens}")
    if a.model:
        cmd += f" --model {a.model}"
    else:
        cmd += f" --formats {a.formats}"
    lines = [
        "## Engine: single-stream prefill and decode vs llama.cpp",
        "",
        f"Default model in each format, {a.threads} threads, medians of {a.repeats} alternating rounds "
        "(llama.cpp's `llama-bench` from the llama-cpp-python 0.3.36 sources, same GGUF, same machine, one run). "
        "Q8_0 and Q4_K_M are made from the Q4_1 file by llama.cpp's `llama-quantize --allow-requantize`.",
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
        start = old.find("## Engine: single-stream")
        if start < 0:
            path.write_text(old.rstrip() + "\n\n" + text)
            return
        # Replace the section's own text, up to its first subsection or the next section (the
        # hand-written subsections after it stay).
        ends = [i for i in (old.find("\n## ", start + 1), old.find("\n### ", start + 1)) if i >= 0]
        rest = old[min(ends) + 1:] if ends else ""
        path.write_text(old[:start] + text + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
