#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (which has the NVIDIA driver, no
# network and no Rust toolchain). Two halves:
#
#   scripts/device_check.sh prepare   here: build the CUDA test binary, compile the kernels to
#                                     PTX for sm_90, cut the default model down to its first
#                                     blocks, and compress them into target/device/ (what the
#                                     device run carries: about 50 MB)
#   scripts/device_check.sh run       there (from the repository root, with target/device
#                                     carried): run it; the report goes to $OUT/device_check.txt
#
# What it checks:
#   (a) every kernel against the CPU engine's own functions and KV cache layout (RMSNorm, RoPE,
#       SwiGLU, residual add, bias, row gather, GEMV over Q8_0/Q4_1/Q4_0/f32, the paged KV store,
#       attention over the paged cache): f32 relative error 1e-3;
#   (b) the whole model: one forward pass on either device over the same mixed batch (prefill
#       chunks and decodes over scattered blocks) gives the same logits (within 5% of their
#       scale) and next tokens, and a KV block read back from the GPU matches the CPU's; the
#       engine on cuda:0 (scheduler, paged cache, sampling) against the engine on the CPU,
#       greedy, 32 tokens, the same on at least 9 of 10 prompts; /health's device report.
# The model is the default model cut to its first $BLOCKS decoder blocks (the carry limit is
# 64 MB; the whole model is 94 MB): still a real model, the same weights on both devices.
# Still to come: the benchmark against llama.cpp's CUDA build (decode at 1 stream, output tok/s
# at 64 streams).
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=target/device
BLOCKS=${BLOCKS:-6}

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
    rm -rf "$DEV"
    mkdir -p "$DEV"
    LASTMILE_WRITE_PTX="$PWD/$DEV/kernels.ptx" "$bin" --exact every_kernel_compiles_for_sm_90_and_assembles >/dev/null
    test -s "$DEV/kernels.ptx"
    model=$(cargo run --release -q -- models pull 2>/dev/null | tail -1)
    python3 scripts/cuda/cut_model.py "$model" "$DEV/model.gguf" --blocks "$BLOCKS"
    xz -T0 -6 "$DEV/model.gguf"
    xz -T0 -6 -c "$bin" > "$DEV/cuda-test.xz"
    du -sh "$DEV"
    echo "carry: $DEV"
    ;;
run)
    out="${OUT:-/tmp}/device_check.txt"
    work=$(mktemp -d)
    xz -dc "$DEV/cuda-test.xz" > "$work/cuda-test"
    chmod +x "$work/cuda-test"
    xz -dc "$DEV/model.gguf.xz" > "$work/model.gguf"
    {
        echo "== $(date -u +%FT%TZ) device check"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
        set +e
        LASTMILE_CUDA_PTX="$PWD/$DEV/kernels.ptx" LASTMILE_CUDA_TEST_MODEL="$work/model.gguf" \
            "$work/cuda-test" --test-threads 1 --nocapture
        echo "== exit $?"
    } 2>&1 | tee "$out"
    ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
