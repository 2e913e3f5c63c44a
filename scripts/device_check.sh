#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent GPU machine (which has the NVIDIA driver, the
# CUDA 13 libraries in its Python environment, no network and no Rust toolchain). A device call
# carries at most 64 MiB; the default model (94 MB) and llama.cpp's CUDA build (~45 MB
# compressed) do not fit in one, so the run comes in three calls made back to back (the machine
# keeps each call's files while it stays warm, 30 s after a call):
#
#   scripts/device_check.sh prepare   here: build the CUDA test binary and `lastmile` with the
#                                     `cuda` feature, compile the kernels to PTX for sm_90, build
#                                     llama.cpp's CUDA backend (the anchor), compress everything
#                                     and split it over target/device1, target/device2 and
#                                     target/device3 (one call's carry each)
#   scripts/device_check.sh run1      there, carrying target/device1: unpack, and (a) the kernel
#                                     checks; report in $OUT/device_check_1.txt
#   scripts/device_check.sh run2      there, right after, carrying target/device2: join the
#                                     model, (b) the whole-model checks, and lastmile's side of
#                                     the engine benchmark; report in $OUT/device_check_2.txt
#   scripts/device_check.sh run3      there, right after, carrying target/device3: join
#                                     llama.cpp, (c) the benchmark against it; report in
#                                     $OUT/device_check_3.txt
#
# What it checks:
#   (a) every kernel against the CPU engine's own functions and KV cache layout (RMSNorm, RoPE,
#       SwiGLU, residual add, bias, row gather, GEMV over Q8_0/Q4_1/Q4_0/f32, the paged KV store,
#       attention over the paged cache): f32 relative error 1e-3;
#   (b) the default model: one forward pass on either device over the same mixed batch (prefill
#       chunks and decodes over scattered blocks) gives the same logits (within 5% of their
#       scale) and next tokens, and a KV block read back from the GPU matches the CPU's; the
#       engine on cuda:0 (scheduler, paged cache, sampling) against the engine on the CPU,
#       greedy, 32 tokens, the same on at least 9 of 10 prompts; /health's device report;
#   (c) against llama.cpp's CUDA build of the same GGUF on the same machine: prefill 512 and
#       decode 128 at one stream, 64 streams decoding at once (`engine-bench`, run2) vs
#       `llama-bench` (run3), and output tok/s served at 1 and 64 streams (`lastmile bench
#       --compare llama-cpp --device cuda:0`, both servers in one run).
#
# LASTMILE_DEVICE_ANCHOR=0 prepares without llama.cpp (its CUDA build takes ~45 min on 2 cores
# the first time): run1 and run2 check and measure lastmile alone, run3 has nothing to run.
set -euo pipefail
cd "$(dirname "$0")/.."
D1=target/device1
D2=target/device2
D3=target/device3
WORK=target/device-work
# What one call may carry beside the repository (~10 MB; the limit is 64 MiB with it).
CARRY_BYTES=$((52 * 1024 * 1024))

# The CUDA 13 runtime and cuBLAS of the GPU machine's Python environment, for llama.cpp.
cuda_lib_path() {
    local f dirs=""
    for lib in libcudart.so.13 libcublas.so.13; do
        f=$(find /opt /usr/local /usr/lib -name "$lib" 2>/dev/null | head -1)
        [[ -n "$f" && ":$dirs" != *":$(dirname "$f"):"* ]] && dirs+="$(dirname "$f"):"
    done
    printf '%s' "$dirs"
}

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
    cargo build --release -q -p lastmile --features cuda
    with_anchor="${LASTMILE_DEVICE_ANCHOR:-1}"
    if [[ "$with_anchor" != 0 ]]; then
        LASTMILE_ANCHOR_TIER=cuda scripts/anchor/build_llama_cpp.sh >/dev/null
    fi
    anchor="${LASTMILE_HOME:-$HOME/.cache/lastmile}/anchor/build-cuda/bin"
    rm -rf "$D1" "$D2" "$D3"
    mkdir -p "$D1" "$D2" "$D3"
    LASTMILE_WRITE_PTX="$PWD/$D1/kernels.ptx" "$bin" --exact every_kernel_compiles_for_sm_90_and_assembles >/dev/null
    test -s "$D1/kernels.ptx"
    strip -o "$D1/cuda-test" "$bin"
    strip -o "$D1/lastmile" target/release/lastmile
    xz -T0 -6 "$D1/cuda-test" "$D1/lastmile"
    # llama.cpp: its binaries and libraries, and the OpenMP runtime they link (not every
    # image has it).
    stage=$(mktemp -d)
    if [[ "$with_anchor" != 0 ]]; then
        cp -a "$anchor"/llama-bench "$anchor"/llama-server "$anchor"/lib*.so* "$stage/"
        gomp=$(gcc -print-file-name=libgomp.so.1)
        cp -L "$gomp" "$stage/"
        strip "$stage"/llama-* 2>/dev/null || true
    fi
    tar -C "$stage" -cf - . | xz -T0 -6 > "$WORK.llama.tar.xz"
    rm -rf "$stage"
    model=$(cargo run --release -q -p lastmile --features cuda -- models pull 2>/dev/null | tail -1)
    basename "$model" > "$D2/model.name"
    sha256sum < "$model" | cut -d' ' -f1 > "$D2/model.sha256"
    xz -T0 -6 -c "$model" > "$WORK.model.xz"
    # The model fills what the first call leaves and goes on into the second; llama.cpp fills
    # the rest of the second and goes on into the third.
    part1=$((CARRY_BYTES - $(du -sb "$D1" | cut -f1)))
    head -c "$part1" "$WORK.model.xz" > "$D1/model.part1"
    tail -c +$((part1 + 1)) "$WORK.model.xz" > "$D2/model.part2"
    part2=$((CARRY_BYTES - $(du -sb "$D2" | cut -f1)))
    head -c "$part2" "$WORK.llama.tar.xz" > "$D2/llama.part1"
    tail -c +$((part2 + 1)) "$WORK.llama.tar.xz" > "$D3/llama.part2"
    rm -f "$WORK.model.xz" "$WORK.llama.tar.xz"
    du -sh "$D1" "$D2" "$D3"
    for d in "$D1" "$D2" "$D3"; do
        size=$(du -sb "$d" | cut -f1)
        if (( size > CARRY_BYTES )); then
            echo "$d is $size bytes: over what one device call carries beside the repository" >&2
            exit 1
        fi
    done
    echo "carry: $D1 (run1), then $D2 (run2), then $D3 (run3), each call right after the last"
    ;;
run1)
    out="${OUT:-/tmp}/device_check_1.txt"
    rm -rf "$WORK"
    mkdir -p "$WORK"
    xz -dc "$D1/cuda-test.xz" > "$WORK/cuda-test"
    xz -dc "$D1/lastmile.xz" > "$WORK/lastmile"
    chmod +x "$WORK/cuda-test" "$WORK/lastmile"
    cp "$D1/kernels.ptx" "$D1/model.part1" "$WORK/"
    {
        echo "== $(date -u +%FT%TZ) device check, part 1: (a) kernels"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
        lscpu | grep -E '^Model name|^CPU\(s\)' || true
        set +e
        LASTMILE_CUDA_PTX="$PWD/$WORK/kernels.ptx" "$WORK/cuda-test" --test-threads 1 --nocapture \
            the_probe_says_what_there_is_and_never_panics the_kernels_compute_what_the_cpu_engine_computes
        echo "== exit $?"
    } 2>&1 | tee "$out"
    ;;
run2)
    out="${OUT:-/tmp}/device_check_2.txt"
    exec > >(tee "$out") 2>&1
    echo "== $(date -u +%FT%TZ) device check, part 2: (b) the default model, (c) lastmile's side"
    if [[ ! -f "$WORK/model.part1" ]]; then
        echo "== $WORK/model.part1 is missing: the machine was given back after run1; run run1 again, then run2 at once"
        exit 3
    fi
    model="$WORK/$(cat "$D2/model.name")"
    cat "$WORK/model.part1" "$D2/model.part2" | xz -dc > "$model"
    if [[ "$(sha256sum < "$model" | cut -d' ' -f1)" != "$(cat "$D2/model.sha256")" ]]; then
        echo "== the joined model does not match its checksum"
        exit 4
    fi
    echo "$model" > "$WORK/model.path"
    cp "$D2/llama.part1" "$WORK/"
    export LASTMILE_CUDA_PTX="$PWD/$WORK/kernels.ptx"
    set +e
    if [[ "${DIAG:-0}" == 1 ]]; then
        # Where GPU and CPU part: one forward pass, the logits' and every layer's KV apart; on
        # the whole model against the CPU's best kernels and its scalar ones, then on the model
        # cut to its first 1 and 4 blocks.
        for cfg in "" "LASTMILE_NO_SIMD=1"; do
            echo "-- diagnosis, whole model, CPU ${cfg:-at its best}"
            env $cfg LASTMILE_CUDA_TEST_MODEL="$model" timeout 100 "$WORK/cuda-test" \
                --test-threads 1 --nocapture the_gpu_forward_pass 2>&1 |
                grep -E 'GPU - CPU|KV block|test result'
        done
        for blocks in 1 4; do
            echo "-- diagnosis, the model cut to $blocks blocks"
            python3 scripts/cuda/cut_model.py "$model" "$WORK/cut$blocks.gguf" --blocks "$blocks"
            LASTMILE_CUDA_TEST_MODEL="$WORK/cut$blocks.gguf" timeout 100 "$WORK/cuda-test" \
                --test-threads 1 --nocapture the_gpu_forward_pass 2>&1 |
                grep -E 'GPU - CPU|KV block|test result'
        done
        exit 0
    fi
    echo "== (b) the default model on cuda:0 against the CPU"
    # As shipped (CUDA graphs, fused kernels); if that fails, again without graphs, then also
    # without fused kernels, to say which part is wrong.
    for cfg in "" "LASTMILE_CUDA_GRAPHS=0" "LASTMILE_CUDA_GRAPHS=0 LASTMILE_CUDA_FUSED=0"; do
        echo "-- ${cfg:-as shipped}"
        env $cfg LASTMILE_CUDA_TEST_MODEL="$model" timeout 200 "$WORK/cuda-test" --test-threads 1 \
            --nocapture the_gpu_forward_pass_computes_the_cpu_logits greedy_tokens_on_the_gpu_match_the_cpu
        rc=$?
        echo "== exit $rc"
        [[ $rc == 0 ]] && break
    done
    echo "== (c1) lastmile engine-bench: prefill 512, decode 128, 64 streams decoding at once;"
    echo "   with CUDA graphs, then without"
    for graphs in 1 0; do
        echo "-- LASTMILE_CUDA_GRAPHS=$graphs"
        LASTMILE_CUDA_GRAPHS=$graphs LASTMILE_STEP_PROFILE=1 timeout 150 "$WORK/lastmile" \
            engine-bench --model "$model" --device cuda:0 --threads 8 --prompt-tokens 512 \
            --gen-tokens 128 --repeats 5 --streams 64 2>&1 | grep -E '^model|step profile|rror|panick'
        echo "== exit $?"
    done
    ;;
run3)
    out="${OUT:-/tmp}/device_check_3.txt"
    exec > >(tee "$out") 2>&1
    echo "== $(date -u +%FT%TZ) device check, part 3: (c) against llama.cpp's CUDA build"
    if [[ ! -f "$WORK/llama.part1" || ! -f "$WORK/model.path" ]]; then
        echo "== run2's files are missing: the machine was given back; run run1, run2, run3 again"
        exit 3
    fi
    model=$(cat "$WORK/model.path")
    mkdir -p "$WORK/llama"
    cat "$WORK/llama.part1" "$D3/llama.part2" | xz -dc | tar -C "$WORK/llama" -xf -
    if [[ ! -x "$WORK/llama/llama-bench" ]]; then
        echo "== prepared with LASTMILE_DEVICE_ANCHOR=0: no llama.cpp to measure against"
        exit 0
    fi
    export LD_LIBRARY_PATH="$(cuda_lib_path)${LD_LIBRARY_PATH:-}"
    export LASTMILE_CUDA_PTX="$PWD/$WORK/kernels.ptx"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    set +e
    echo "== (c1) llama-bench: prefill 512, decode 128, flash attention on and off"
    LD_LIBRARY_PATH="$PWD/$WORK/llama:$LD_LIBRARY_PATH" timeout 120 "$WORK/llama/llama-bench" \
        -m "$model" -ngl 999 -p 512 -n 128 -r 5 -t 8 -fa on,off
    echo "== exit $?"
    echo "== (c2) served, both on cuda:0: output tok/s at 1 stream, then at 64"
    export LASTMILE_STEP_PROFILE=1
    for level in "1 16" "64 256"; do
        set -- $level
        timeout 200 "$WORK/lastmile" bench --compare llama-cpp --device cuda:0 --gguf "$model" \
            --llama-server "$PWD/$WORK/llama/llama-server" --threads 8 --concurrency "$1" \
            --requests "$2" --input-tokens 128 --output-tokens 128 --rounds 2 2>&1 |
            grep -v -E '^\s*$|Downloading|%\|'
        echo "== exit $?"
    done
    echo "== (d) the yardstick of (b): llama.cpp's own CPU and CUDA backends, greedy, same prompts"
    timeout 120 python3 scripts/cuda/llama_cpu_vs_gpu.py "$PWD/$WORK/llama/llama-server" "$model"
    echo "== exit $?"
    for f in /tmp/lastmile-bench-*.log; do
        echo "== $f: its last lines, and its last step profiles"
        grep -v 'step profile' "$f" | tail -4
        grep 'step profile' "$f" | tail -4
    done
    ;;
*)
    echo "usage: $0 prepare|run1|run2|run3" >&2
    exit 2
    ;;
esac
