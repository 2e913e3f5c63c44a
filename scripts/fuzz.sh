#!/usr/bin/env bash
# Fuzzes every target of crates/fuzz for SECONDS each (default 600) with libFuzzer, one after
# another, growing fuzz/corpus/<target>/ and leaving any crash under fuzz/artifacts/<target>/.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`); the corpus replay in
# the ordinary tests (crates/fuzz/tests/corpus.rs) needs neither.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(chat completions messages chat_template gguf deployments)
fi
[ -d corpus ] || python3 seeds.py
cargo +nightly fuzz build --sanitizer none -O
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: ${secs} s"
    # A finding stops that target (its input is under artifacts/); the others still run.
    (cargo +nightly fuzz run --sanitizer none -O "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=20 -rss_limit_mb=6144 -max_len=16384 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>&1 || echo "== $t: stopped on a finding") | tail -n 25
done
