#!/usr/bin/env python3
"""Draft-model speculative decoding against plain decoding, one stream, beside llama.cpp's server
with the same pair of models, one run.

The pair: a served model and a cheaper draft model with the same tokenizer. By default the
served model is the default model written out as F16 (`llama-quantize --allow-requantize ...
F16` from the anchor build, cached next to it: 4x the bytes a token, so decode is 3-4x slower)
and the draft is the default Q4_1 file itself — the setting of a 16-bit model drafted by its own
4-bit quantization. Caveat: this F16 file is made *from* the Q4_1 one, so the two models differ
only by rounding (activations quantized to 8 bits in the Q4_1 kernels, not in F16): the
acceptance rate here is an upper end. `--served` and `--draft` take any other pair.

Workload: the open-ended prompts of `bench_speculative.py` (where prompt lookup finds nothing
to copy, so the draft model is what speculation has), greedy `/v1/completions`, streamed, one at a
time. Each prompt runs with `"speculative": {"max_draft": 0}`, with prompt lookup and with the
draft model (`{"method": "draft_model", "max_draft": K}`), in turn, over several rounds; decode
speed = (completion tokens - 1) / time after the first streamed token, medians per mode.
llama.cpp's `llama-server` (anchor build, same files, same threads) runs the same prompts through
the same client, plain and with `-md DRAFT --spec-draft-n-max K`.

    python3 scripts/bench_draft_model.py [--rounds 3] [--max-draft 8] [--threads 2]
                                         [--served F.gguf --draft D.gguf] [--tier avx2]
                                         [--no-anchor] [--write BENCHMARKS.md]

Needs `cargo build --release` first (and `scripts/anchor/build_llama_cpp.sh` for the anchor and
the F16 file); about ten minutes on 2 cores.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sandbox import cpu_line, progress, write_section  # noqa: E402
from bench_speculative import OPEN, counters, stream_completion  # noqa: E402
from lastmile_proc import ROOT, start  # noqa: E402

HEADING = "## Speculative decoding with a draft model: one stream"

# tier: (lastmile --kernels, anchor build folder)
TIERS = {"native": ("auto", "build"), "avx2": ("avx2", "build-avx2")}


def served_id(port):
    """The id of the one model the server on `port` serves."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    models = json.loads(conn.getresponse().read())["data"]
    conn.close()
    return models[0]["id"]


def stream(port, prompt, max_tokens, speculative, model=None):
    """One streamed greedy completion from the server on `port` (see `stream_completion`), of
    `model` (default: asked of the server)."""
    return stream_completion("127.0.0.1", port, prompt, max_tokens, speculative, model or served_id(port))


class LlamaServer:
    """llama.cpp's server on a free port, until `stop()`."""

    def __init__(self, binary, args):
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.log = open(f"/tmp/llama-server-{self.port}.log", "wb")
        self.proc = subprocess.Popen([str(binary), *args, "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)})
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited: {Path(self.log.name).read_text()[-800:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("llama-server did not come up")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_modes(port, modes, rounds, label, lastmile):
    """Each prompt in each mode (name -> speculative extension), in turn; returns per-mode
    speeds, the texts per (prompt, mode) of the last round, and per-mode (drafted, kept)."""
    speeds = {m: [] for m in modes}
    texts = {}
    drafts = {m: [0.0, 0.0] for m in modes}
    steps, done = rounds * len(OPEN) * len(modes), 0
    model = served_id(port)
    for _ in range(rounds):
        for name, prompt, max_tokens in OPEN:
            for mode, spec in modes.items():
                d0, k0 = counters("127.0.0.1", port) if lastmile else (0, 0)
                text, tokens, secs = stream(port, prompt, max_tokens, spec, model)
                if lastmile:
                    d1, k1 = counters("127.0.0.1", port)
                    drafts[mode][0] += d1 - d0
                    drafts[mode][1] += k1 - k0
                if tokens > 1 and secs > 0:
                    speeds[mode].append((tokens - 1) / secs)
                texts[(name, mode)] = text
                done += 1
                progress(done, steps, f"{label} {name} ({mode})".ljust(36))
    return speeds, texts, drafts


def f16_of(model, quantize):
    """The F16 copy of `model`, written once by `llama-quantize` next to it."""
    out = model.with_name(model.name.replace(".Q4_1.gguf", ".F16.gguf"))
    if not out.exists():
        print(f"writing {out.name} with llama-quantize ...", file=sys.stderr)
        subprocess.run([str(quantize), "--allow-requantize", str(model), str(out), "F16"], check=True,
                       capture_output=True, env={**os.environ, "LD_LIBRARY_PATH": str(quantize.parent)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-draft", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--served", type=Path, help="the served model (default: the default model as F16)")
    ap.add_argument("--draft", type=Path, help="the draft model (default: the default model, Q4_1)")
    ap.add_argument("--tier", choices=sorted(TIERS), default="native",
                    help="lastmile's kernels and the llama.cpp build to use (avx2: both forced to AVX2)")
    ap.add_argument("--no-anchor", action="store_true", help="skip llama.cpp's server")
    ap.add_argument("--write", help="update this Markdown file's draft-model section")
    a = ap.parse_args()
    kernels, build = TIERS[a.tier]
    anchor = Path(os.environ.get("LASTMILE_ANCHOR_DIR", Path.home() / ".cache/lastmile/anchor")) / build / "bin"
    default = Path(subprocess.run([str(ROOT / "target/release/lastmile"), "models", "pull"], check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1])
    draft = a.draft or default
    if a.served:
        served = a.served
    elif (anchor / "llama-quantize").exists():
        served = f16_of(default, anchor / "llama-quantize")
    else:
        sys.exit("no --served model and no llama-quantize to write the F16 one (scripts/anchor/build_llama_cpp.sh)")
    k = a.max_draft
    modes = {"off": {"max_draft": 0}, "lookup": {"method": "prompt_lookup", "ngram": 3, "max_draft": k},
             "draft model": {"method": "draft_model", "max_draft": k}}
    with start(["serve", "--model", served, "--draft-model", draft, "--threads", a.threads,
                "--kernels", kernels]) as server:
        stream(server.port, "Hello", 8, {"max_draft": 0})
        ours, our_texts, drafts = run_modes(server.port, modes, a.rounds, "lastmile", True)
    identical = all(our_texts[(n, m)] == our_texts[(n, "off")] for n, _, _ in OPEN for m in modes)
    theirs = {}
    if not a.no_anchor and (anchor / "llama-server").exists():
        common = ["-m", str(served), "-t", str(a.threads), "-c", "4096", "-np", "1", "--temp", "0"]
        for mode, extra in (("off", []), ("draft model", ["-md", str(draft), "--spec-draft-n-max", str(k),
                                                          "-td", str(a.threads)])):
            srv = LlamaServer(anchor / "llama-server", common + extra)
            try:
                stream(srv.port, "Hello", 8, None)
                speeds, _, _ = run_modes(srv.port, {mode: None}, a.rounds, "llama-server", False)
                theirs[mode] = speeds[mode]
            finally:
                srv.stop()
    med = {m: statistics.median(v) for m, v in ours.items()}
    acc = {m: (d[1] / d[0] if d[0] else 0.0) for m, d in drafts.items()}
    lines = [
        HEADING,
        "",
        f"**CPU: {cpu_line()}; kernels: {a.tier}.** Served model `{served.name}`, draft model `{draft.name}` "
        f"(`lastmile serve --model SERVED --draft-model DRAFT --threads {a.threads}`), one stream, greedy "
        f"`/v1/completions` on {len(OPEN)} open-ended prompts (where prompt lookup has nothing to copy), "
        f"each with drafts off, by prompt lookup and by the draft model (`max_draft` {k}), in turn, "
        f"{a.rounds} rounds; decode speed = (completion tokens - 1) / time after the first token, medians. "
        "Acceptance = draft tokens kept / verified (server counters).",
        "",
        "| lastmile | decode tok/s | vs off | acceptance |",
        "| --- | ---: | ---: | ---: |",
    ]
    for m in modes:
        lines.append(f"| {m} | {med[m]:.1f} | **{med[m] / med['off']:.2f}x** | "
                     f"{'' if m == 'off' else f'{acc[m]:.0%}'} |")
    lines += ["", f"Greedy output identical in every mode: **{'yes' if identical else 'NO'}**."]
    if theirs:
        t = {m: statistics.median(v) for m, v in theirs.items()}
        lines += ["", f"llama.cpp's `llama-server` ({build} build), same files, same client, `-t {a.threads}`, "
                  f"plain and with `-md DRAFT --spec-draft-n-max {k} -td {a.threads}`:", "",
                  "| llama-server | decode tok/s | vs off | lastmile / llama-server |",
                  "| --- | ---: | ---: | ---: |"]
        for m, ours_m in (("off", "off"), ("draft model", "draft model")):
            lines.append(f"| {m} | {t[m]:.1f} | {t[m] / t['off']:.2f}x | **{med[ours_m] / t[m]:.2f}x** |")
    lines += ["", "The default pair's caveat: the F16 file is written from the Q4_1 one, so the two "
              "differ only by rounding and the acceptance rate is an upper end; a real pair (a 0.5B "
              "drafting for a 7B) keeps fewer drafts.", "",
              f"Reproduce: `python3 scripts/bench_draft_model.py --rounds {a.rounds} --max-draft {k} "
              f"--threads {a.threads} --tier {a.tier}` (after `scripts/anchor/build_llama_cpp.sh`)", ""]
    write_section("\n".join(lines), HEADING, a.write)


if __name__ == "__main__":
    main()
