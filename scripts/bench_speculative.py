#!/usr/bin/env python3
"""Speculative decoding (prompt lookup) against plain decoding, one stream, one server, one run.

Two workloads of fixed prompts, greedy completions, sent one at a time to `lastmile serve`
(default model):
- grounded: the answer repeats its input — fix the typos of a ~700-token document, rename
  something in it, rename a variable in a function, extract a paragraph — where drafts from the
  prompt should be kept;
- open: open-ended text, where drafts mostly fail (the cost side).
Each prompt runs with `"speculative": {"max_draft": 0}` and with `{"ngram": N, "max_draft": K}`,
alternating, over several rounds. Decode speed = (completion tokens - 1) / time after the first
streamed token; the table gives per-workload medians, the ratio, the acceptance rate (from the
server's counters) and whether every greedy answer was byte-identical.

    python3 scripts/bench_speculative.py [--rounds 3] [--ngram 3] [--max-draft 8] [--threads 2]
                                         [--no-anchor] [--write BENCHMARKS.md]

With the llama.cpp anchor built (`scripts/anchor/build_llama_cpp.sh`, native tier), the same
prompts also go through llama.cpp's own prompt-lookup decoding, `llama-lookup` (greedy, drafts of
up to --max-draft tokens, and 0 for plain decoding), one process per completion; its decode speed
is the one it prints (tokens after the prompt / their time).

Needs `cargo build --release` first; about five minutes on 2 cores (eight with the anchor).
"""

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sandbox import cpu_line, progress, write_section  # noqa: E402
from lastmile_proc import start  # noqa: E402

MODEL = "smollm2-135m-instruct"
HEADING = "## Speculative decoding (prompt lookup): one stream"

DOCUMENT = """The Riverside Community Library opened its doors in 1952, when a group of teachers \
collected four hundred books in the back room of the old post office. For the first ten years \
the library was run entirely by volunteers, who kept the catalogue on index cards and opened \
the reading room three evenings a week. In 1964 the town council agreed to pay for a full-time \
librarian, and the collection moved to the former grain exchange on Market Street, where it \
still stands today.

The building itself has a long history. It was built in 1889 as a trading hall for farmers, \
with a high glass roof that let in enough light for buyers to inspect samples of wheat and \
barley. When the grain trade moved to the railway yards, the hall stood empty for almost \
twenty years. The library board bought it for one dollar on the condition that the roof be \
repaired, and the repairs took three summers of work by local carpenters and glaziers.

Today the library holds more than sixty thousand books, a collection of local newspapers going \
back to 1871, and a small museum of farming tools donated by families from the valley. It \
offers free computer classes for adults, a reading club for children on Saturday mornings, and \
a quiet study room that stays open until ten o'clock during the school exam season. Last year \
the library lent more than one hundred thousand items and welcomed visitors from every town in \
the county.

The library is now planning its next chapter. The board has asked the council for funds to \
open three new branches next spring: one in the northern housing estates, one beside the new \
primary school, and one in the village of Hollow Creek, where the nearest library is more than \
an hour away by bus. Each branch will have a small collection of books, four public computers, \
and a room that community groups can book for meetings. The board expects the branches to \
serve about five thousand new members in their first year.

Volunteers remain at the heart of the library. More than eighty people give their time each \
month, shelving books, running the children's reading club, and helping older visitors learn \
to use email and video calls. The library thanks every volunteer with a dinner each December, \
and the longest-serving volunteer, a retired teacher named Margaret Hale, has helped at the \
front desk every Tuesday since 1979."""

CODE = '''def summarize(values):
    """Return the count, total, mean and largest value of a list of numbers."""
    if not values:
        return {"count": 0, "total": 0, "mean": None, "largest": None}
    total = 0
    largest = values[0]
    for value in values:
        total += value
        if value > largest:
            largest = value
    mean = total / len(values)
    return {"count": len(values), "total": total, "mean": mean, "largest": largest}
'''

def typos(text):
    """`text` with "the " misspelt "teh " in six places."""
    return text.replace("the ", "teh ", 6)


# Framed as completions: the default model (135M parameters) paraphrases when asked in a chat
# to copy or edit, but continues a document it has seen as a base model would.
GROUNDED = [
    ("fix typos", f"Original text (with typos):\n{typos(DOCUMENT)}\n\nThe same text with the typos "
                  "fixed:\n", 320),
    ("rename", f"Original text:\n{DOCUMENT}\n\nThe same text, with the library renamed to the "
               "Brookside Public Library:\n", 320),
    ("code edit", f"```python\n{CODE}```\n\nThe same function with `total` renamed to "
                  "`running_sum`:\n```python\n", 200),
    ("extract", f"Notes:\n{DOCUMENT}\n\nThe fourth paragraph of the notes, word for word:\n", 200),
]

OPEN = [
    ("story", "Once upon a time, a dragon who loved to bake bread", 160),
    ("advice", "The five best habits for staying healthy while working from home are", 160),
    ("explain", "A rainbow forms when", 160),
    ("history", "The history of the Roman Empire", 160),
]


def stream_completion(host, port, prompt, max_tokens, speculative, model=MODEL):
    """One streamed greedy completion; returns (text, completion tokens, seconds after the
    first token). `speculative` None sends no extension (another server)."""
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if speculative is not None:
        body["speculative"] = speculative
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {resp.read()[:300]!r}")
    text, first, tokens, pieces = [], None, 0, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        for c in chunk.get("choices", []):
            piece = c.get("text")
            if piece:
                text.append(piece)
                pieces += 1
                if first is None:
                    first = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    return "".join(text), tokens or pieces, end - (first or end)


def counters(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    page = conn.getresponse().read().decode()
    conn.close()
    got = {}
    for line in page.splitlines():
        for name in ("lastmile_engine_draft_tokens_total", "lastmile_engine_accepted_draft_tokens_total"):
            if line.startswith(name + " "):
                got[name] = float(line.split()[1])
    return got.get("lastmile_engine_draft_tokens_total", 0), \
        got.get("lastmile_engine_accepted_draft_tokens_total", 0)


def measure(server, workload, rounds, spec):
    host, port = "127.0.0.1", server.port
    off = {"max_draft": 0}
    speeds = {"off": [], "on": []}
    identical, drafted, kept = True, 0.0, 0.0
    per_prompt = {}
    steps = rounds * len(workload) * 2
    done = 0
    for _ in range(rounds):
        for name, prompt, max_tokens in workload:
            texts = {}
            for mode in ("off", "on"):
                d0, k0 = counters(host, port)
                text, tokens, secs = stream_completion(host, port, prompt, max_tokens, spec if mode == "on" else off)
                d1, k1 = counters(host, port)
                if mode == "on":
                    drafted += d1 - d0
                    kept += k1 - k0
                texts[mode] = text
                if tokens > 1 and secs > 0:
                    speeds[mode].append((tokens - 1) / secs)
                    per_prompt.setdefault(name, {}).setdefault(mode, []).append((tokens - 1) / secs)
                done += 1
                progress(done, steps, f"{name} ({mode})".ljust(16))
            if texts["on"] != texts["off"]:
                identical = False
                print(f"\n{name}: outputs differ", file=sys.stderr)
    medians = {name: {m: statistics.median(v) for m, v in modes.items()} for name, modes in per_prompt.items()}
    for name, m in medians.items():
        print(f"  {name}: off {m['off']:.1f} tok/s, on {m['on']:.1f} tok/s", file=sys.stderr)
    return speeds, identical, (kept / drafted if drafted else 0.0), medians


def llama_lookup(binary, model, prompt, max_tokens, draft, threads):
    """One greedy `llama-lookup` completion; returns (decode tok/s, tokens drafted, kept)."""
    out = subprocess.run(
        [str(binary), "-m", str(model), "-p", prompt, "-n", str(max_tokens), "--spec-draft-n-max",
         str(draft), "-t", str(threads), "--temp", "0", "-c", "4096"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)})
    log = out.stdout + out.stderr
    speed = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", log)
    drafted = re.search(r"n_drafted\s+=\s+(\d+)", log)
    kept = re.search(r"n_accept\s+=\s+(\d+)", log)
    if out.returncode != 0 or not (speed and drafted and kept):
        raise RuntimeError(f"llama-lookup failed ({out.returncode}): {log[-500:]}")
    return float(speed.group(1)), int(drafted.group(1)), int(kept.group(1))


def measure_lookup(binary, model, workload, rounds, max_draft, threads):
    """llama-lookup on `workload`: speeds off (no drafts) and on, and its acceptance."""
    speeds = {"off": [], "on": []}
    drafted = kept = 0
    steps, done = rounds * len(workload) * 2, 0
    for _ in range(rounds):
        for name, prompt, max_tokens in workload:
            for mode in ("off", "on"):
                tok_s, d, k = llama_lookup(binary, model, prompt, max_tokens,
                                           max_draft if mode == "on" else 0, threads)
                speeds[mode].append(tok_s)
                if mode == "on":
                    drafted, kept = drafted + d, kept + k
                done += 1
                progress(done, steps, f"llama-lookup {name} ({mode})".ljust(28))
    return speeds, (kept / drafted if drafted else 0.0)


def anchor_lookup():
    """The anchor's llama-lookup (native build), if built."""
    anchor = Path(os.environ.get("LASTMILE_ANCHOR_DIR", Path.home() / ".cache/lastmile/anchor"))
    path = anchor / "build/bin/llama-lookup"
    return path if path.exists() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--max-draft", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-anchor", action="store_true", help="skip llama.cpp's llama-lookup")
    ap.add_argument("--write", help="update this Markdown file's speculative decoding section")
    a = ap.parse_args()
    lookup = None if a.no_anchor else anchor_lookup()
    if lookup is None and not a.no_anchor:
        print("llama-lookup not built (scripts/anchor/build_llama_cpp.sh): lastmile only", file=sys.stderr)
    spec = {"ngram": a.ngram, "max_draft": a.max_draft}
    rows = []
    with start(["serve", "--threads", str(a.threads)]) as server:
        # Warm-up: page the weights in.
        stream_completion("127.0.0.1", server.port, "Hello", 8, {"max_draft": 0})
        for label, workload in (("grounded (fix typos, rename, code edit, extract)", GROUNDED),
                                ("open-ended text", OPEN)):
            speeds, identical, acceptance, medians = measure(server, workload, a.rounds, spec)
            off, on = statistics.median(speeds["off"]), statistics.median(speeds["on"])
            rows.append((label, off, on, on / off, acceptance, identical, medians))
    anchor_rows = []
    if lookup is not None:
        model = Path(subprocess.run([str(Path(__file__).resolve().parents[1] / "target/release/lastmile"),
                                     "models", "pull"], check=True, capture_output=True,
                                    text=True).stdout.strip())
        for (label, *_), workload in zip(rows, (GROUNDED, OPEN)):
            speeds, acceptance = measure_lookup(lookup, model, workload, a.rounds, a.max_draft, a.threads)
            off, on = statistics.median(speeds["off"]), statistics.median(speeds["on"])
            anchor_rows.append((label, off, on, on / off, acceptance))
    med = f"medians over {a.rounds} rounds of {len(GROUNDED)} prompts each"
    lines = [
        HEADING,
        "",
        f"**CPU: {cpu_line()}.** Default model, `lastmile serve --threads {a.threads}`, one stream, greedy "
        "`/v1/completions` (the 135M default model paraphrases when a chat asks it to copy, so the "
        "grounded prompts are framed as documents to continue); "
        f"each prompt with `\"speculative\": {{\"max_draft\": 0}}` and with `{json.dumps(spec)}`, alternating "
        f"({med}). Decode speed = (completion tokens - 1) / time after the first token. Acceptance = draft "
        "tokens kept / draft tokens verified (server counters).",
        "",
        "| workload | decode tok/s, off | decode tok/s, on | ratio | acceptance | greedy output identical |",
        "| --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for label, off, on, ratio, acc, same, _ in rows:
        lines.append(f"| {label} | {off:.1f} | {on:.1f} | **{ratio:.2f}x** | {acc:.0%} | {'yes' if same else 'NO'} |")
    lines += ["", "Per prompt (medians, decode tok/s off → on): " + "; ".join(
        f"{name} {m['off']:.0f} → {m['on']:.0f} ({m['on'] / m['off']:.2f}x)"
        for *_, medians in rows for name, m in medians.items()) + "."]
    if anchor_rows:
        lines += ["", "The same prompts through llama.cpp's prompt-lookup decoding (`llama-lookup` from the "
                  "anchor build, native flags, same GGUF, greedy, `--spec-draft-n-max "
                  f"{a.max_draft}` against 0, `-t {a.threads}`, one process per completion, decode "
                  "speed as it prints it), same run:", "",
                  "| workload | llama-lookup off | llama-lookup on | its ratio | its acceptance "
                  "| lastmile on / llama-lookup on |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for (label, off, on, ratio, acc), ours in zip(anchor_rows, rows):
            lines.append(f"| {label} | {off:.1f} | {on:.1f} | {ratio:.2f}x | {acc:.0%} | **{ours[2] / on:.2f}x** |")
    lines += ["", f"Reproduce: `python3 scripts/bench_speculative.py --rounds {a.rounds} --ngram {a.ngram} "
              f"--max-draft {a.max_draft} --threads {a.threads}`"
              + (" (after `scripts/anchor/build_llama_cpp.sh`, for llama-lookup)" if anchor_rows else ""), ""]
    write_section("\n".join(lines), HEADING, a.write)


if __name__ == "__main__":
    main()
