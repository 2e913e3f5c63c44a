#!/usr/bin/env bash
# Build the llama.cpp anchor (the copy vendored in the llama-cpp-python 0.3.36 sdist): CPU only,
# shared libraries, for one instruction-set tier. Idempotent: the download, the unpacking and the
# build are each skipped when their result is already there.
#
#   scripts/anchor/build_llama_cpp.sh                          # native flags (or print the paths)
#   LASTMILE_ANCHOR_TIER=avx2 scripts/anchor/build_llama_cpp.sh  # as on an AVX2-only CPU
#
# Environment:
#   LASTMILE_ANCHOR_DIR   where everything goes (default: $HOME/.cache/lastmile/anchor)
#   LASTMILE_ANCHOR_JOBS  parallel compile jobs (default: 2)
#   LASTMILE_ANCHOR_TIER  native (default: this CPU's flags, build/), avx2 (AVX2 + FMA + F16C,
#                         no AVX-512: build-avx2/), avxvnni (the same with AVX-VNNI, as on an
#                         Alder Lake or later Intel client CPU: build-avxvnni/) or avx512
#                         (AVX-512 with VNNI, VBMI and BF16, no AMX: build-avx512/); the tiers
#                         match lastmile's `--kernels` tiers, so one machine measures each;
#                         or cuda: the CUDA backend for Hopper (sm_90, every layer on the GPU
#                         with `-ngl 999`; host code at the avx2 tier), built here without a GPU
#                         with the PyPI toolkit of `scripts/cuda/toolchain.sh --full` (build-cuda/, only
#                         llama-bench and llama-server; run it where the driver and the CUDA 13
#                         runtime and cuBLAS libraries are on the library path)
#
# Results: $LASTMILE_ANCHOR_DIR/build[-TIER]/bin/{llama-bench,llama-server,llama-quantize,
# llama-lookup,libllama.so,libggml*.so}. make_golden.py loads libllama.so from build/bin through
# LLAMA_CPP_LIB_PATH.
set -euo pipefail

VERSION=0.3.36
ANCHOR_DIR="${LASTMILE_ANCHOR_DIR:-$HOME/.cache/lastmile/anchor}"
JOBS="${LASTMILE_ANCHOR_JOBS:-2}"
SDIST_DIR="$ANCHOR_DIR/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
SRC_ROOT="$ANCHOR_DIR/llama_cpp_python-$VERSION"
SRC="$SRC_ROOT/vendor/llama.cpp"
TIER="${LASTMILE_ANCHOR_TIER:-native}"
case "$TIER" in
    native) BUILD="$ANCHOR_DIR/build" ;;
    avx2|avx512|avxvnni|cuda) BUILD="$ANCHOR_DIR/build-$TIER" ;;
    *) echo "anchor: LASTMILE_ANCHOR_TIER must be native, avx2, avxvnni, avx512 or cuda, not '$TIER'" >&2; exit 2 ;;
esac
BIN="$BUILD/bin"
# llama-lookup: llama.cpp's prompt-lookup (n-gram) speculative decoding, which
# scripts/bench_speculative.py sets beside lastmile's.
TARGETS=(llama-bench llama-server llama-quantize llama-lookup llama)
OUTPUTS=(llama-bench llama-server llama-quantize llama-lookup libllama.so)
if [[ $TIER == cuda ]]; then
    TARGETS=(llama-bench llama-server)
    OUTPUTS=(llama-bench llama-server libllama.so libggml-cuda.so)
fi

mkdir -p "$SDIST_DIR"

# 1. The sdist (llama.cpp's source rides inside it, under vendor/llama.cpp).
if [[ ! -f "$SDIST" ]]; then
    echo "anchor: downloading llama-cpp-python $VERSION sdist into $SDIST_DIR"
    python3 -m pip download --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi
[[ -f "$SDIST" ]] || { echo "anchor: $SDIST missing after download" >&2; exit 1; }

# 2. Unpack (once).
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    echo "anchor: unpacking $SDIST"
    tar -xzf "$SDIST" -C "$ANCHOR_DIR"
fi

# 3. Configure and build, unless every output is there from a build with these same options.
#
# AMX is switched off inside ggml: with -march=native on an AMX machine, GCC 12 drops the stores
# that fill ggml's tile configuration before `ldtilecfg` (all tiles end up 0x0), so the first
# AMX matmul (prompt batches) dies with SIGILL. The flags go in through a project include so they
# reach only the ggml targets; explicit -mno-* win over -march=native whatever their order.
NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# The instruction sets ggml may use: this CPU's, or exactly one tier's (the rest forced off).
case "$TIER" in
    native) TIER_ARGS=(-DGGML_NATIVE=ON) ;;
    avx2) TIER_ARGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF
                     -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF) ;;
    avxvnni) TIER_ARGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                        -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF
                        -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF) ;;
    avx512) TIER_ARGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                       -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
                       -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON) ;;
    cuda) TIER_ARGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_BMI2=ON -DGGML_AVX512=OFF) ;;
esac
CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=ON
    "${TIER_ARGS[@]}"
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=ON
    -DLLAMA_BUILD_APP=OFF
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF
    "-DCMAKE_PROJECT_ggml_INCLUDE=$BUILD/lastmile-ggml-flags.cmake"
)
if [[ $TIER == cuda ]]; then
    # The CUDA backend for Hopper alone (no NCCL: one GPU). The driver library is a link stub
    # here (scripts/cuda/toolchain.sh --full); the GPU machine's own driver is loaded there.
    eval "$("$(dirname "$0")/../cuda/toolchain.sh" --full --env)"
    CMAKE_ARGS=(
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON "${TIER_ARGS[@]}"
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
        -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES=90
        "-DCUDAToolkit_ROOT=$CUDA_HOME" "-DCMAKE_CUDA_COMPILER=$CUDA_HOME/bin/nvcc"
    )
fi
STAMP="$BUILD/lastmile-config.txt"
WANT_STAMP="$(printf '%s\n' "$VERSION" "$NO_AMX_FLAGS" "${CMAKE_ARGS[@]}")"

have_all=1
for out in "${OUTPUTS[@]}"; do
    [[ -e "$BIN/$out" ]] || have_all=0
done
if [[ $have_all == 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]]; then
    echo "anchor: already built, skipping"
else
    start=$(date +%s)
    mkdir -p "$BUILD"
    rm -f "$STAMP"
    printf 'string(APPEND CMAKE_C_FLAGS " %s")\nstring(APPEND CMAKE_CXX_FLAGS " %s")\n' \
        "$NO_AMX_FLAGS" "$NO_AMX_FLAGS" > "$BUILD/lastmile-ggml-flags.cmake"
    # Offline-friendly: no curl, no OpenSSL, no web UI download, no tests or unified app (the
    # examples are configured for llama-lookup; only the targets above are built).
    nice -n 19 cmake -S "$SRC" -B "$BUILD" "${CMAKE_ARGS[@]}"
    nice -n 19 cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}"
    if objdump -d "$BIN/libggml-cpu.so" 2>/dev/null | grep -q ldtilecfg; then
        echo "anchor: libggml-cpu.so still contains AMX code; refusing it" >&2
        exit 1
    fi
    # An AVX2 build must hold no AVX-512 instruction (one on zmm registers would betray it).
    if [[ $TIER == avx2 || $TIER == avxvnni ]] && objdump -d "$BIN/libggml-cpu.so" 2>/dev/null | grep -q '%zmm'; then
        echo "anchor: the avx2 build of libggml-cpu.so uses AVX-512 registers; refusing it" >&2
        exit 1
    fi
    printf '%s\n' "$WANT_STAMP" > "$STAMP"
    echo "anchor: build took $(( $(date +%s) - start )) s"
fi

for out in "${OUTPUTS[@]}"; do
    [[ -e "$BIN/$out" ]] || { echo "anchor: missing $BIN/$out" >&2; exit 1; }
done

echo "anchor: llama.cpp (llama-cpp-python $VERSION, tier $TIER) binaries:"
for out in "${OUTPUTS[@]}"; do echo "  $BIN/$out"; done
echo "anchor: ggml libraries: $(cd "$BIN" && ls libggml*.so 2>/dev/null | tr '\n' ' ')"
echo "anchor: python sources: $SRC_ROOT/llama_cpp (set LLAMA_CPP_LIB_PATH=$BIN)"
