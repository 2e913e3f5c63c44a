#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (which has the NVIDIA driver, no
# network and no Rust toolchain). Two halves:
#
#   scripts/device_check.sh prepare   here: build the CUDA test binary, compress it and NVRTC
#                                     into target/device/ (what the device run carries)
#   scripts/device_check.sh run       there (from the repository root, with target/device
#                                     carried): run it; the report goes to $OUT/device_check.txt
#
# What it checks today: every kernel compiles for the device's own architecture and computes
# what the CPU engine computes (RMSNorm, RoPE, SwiGLU, residual add, Q8_0/Q4_1 GEMV, the paged
# KV store in the CPU cache's exact layout, decode attention over it): f32 relative error 1e-3.
# The forward pass on the GPU, greedy GPU-vs-CPU tokens and the benchmark against llama.cpp's
# CUDA build come with the engine's CUDA forward pass.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=target/device

case "${1:-}" in
prepare)
    eval "$(scripts/cuda/toolchain.sh --env)"
    bin=$(cargo test --release -p lastmile-engine --features cuda --test cuda --no-run \
        --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])' | tail -1)
    mkdir -p "$DEV/lib"
    xz -T0 -6 -c "$bin" > "$DEV/cuda-test.xz"
    for l in libnvrtc.so.13 libnvrtc-builtins.so.13.0; do
        xz -T0 -6 -c "$CUDA_HOME/lib/$l" > "$DEV/lib/$l.xz"
    done
    du -sh "$DEV"
    echo "carry: $DEV"
    ;;
run)
    out="${OUT:-/tmp}/device_check.txt"
    work=$(mktemp -d)
    xz -dc "$DEV/cuda-test.xz" > "$work/cuda-test"
    chmod +x "$work/cuda-test"
    mkdir -p "$work/lib"
    for f in "$DEV"/lib/*.xz; do xz -dc "$f" > "$work/lib/$(basename "$f" .xz)"; done
    ln -sf libnvrtc.so.13 "$work/lib/libnvrtc.so"
    {
        echo "== $(date -u +%FT%TZ) device check"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
        # The machine's own NVRTC first, if it has one; ours (13.0) otherwise.
        LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$work/lib" \
            "$work/cuda-test" --test-threads 1 --nocapture
        echo "== exit $?"
    } 2>&1 | tee "$out"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
