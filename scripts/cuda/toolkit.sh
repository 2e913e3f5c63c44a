#!/usr/bin/env bash
# A whole CUDA 13.0 toolkit for building C++ CUDA code here (llama.cpp's CUDA backend, the anchor
# of the GPU benchmark), from PyPI wheels: these machines have no GPU and no CUDA toolkit from
# their distribution. nvcc and ptxas, cicc (nvvm), the runtime and its headers, CCCL (thrust, cub),
# cuBLAS (headers, and the libraries to link against), merged into one tree with a toolkit's
# layout (`lib64` a link to `lib`) and a link stub for the driver library (`lib/stubs/libcuda.so`,
# SONAME `libcuda.so.1`, no symbols: link with `--allow-shlib-undefined`; the real driver of the
# GPU machine resolves them when the program starts there). Pinned to 13.0: the lent GPU machines'
# driver is 580.x (CUDA 13.0) and newer toolkits emit PTX it may refuse.
#
#   scripts/cuda/toolkit.sh          fetch and unpack (once, ~500 MB of wheels) into
#                                    $LASTMILE_HOME/cuda-tk-13.0; print that path
#   eval "$(scripts/cuda/toolkit.sh --env)"   ... and set PATH, CUDA_HOME, CUDAToolkit_ROOT
set -euo pipefail

HOME_DIR="${LASTMILE_HOME:-$HOME/.cache/lastmile}"
DEST="$HOME_DIR/cuda-tk-13.0"
WHEELS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cublas==13.0.2.14
)
PYTHON="${PYTHON:-python3}"

if [[ ! -f "$DEST/.complete" ]]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "lastmile: fetching a CUDA 13.0 toolkit (nvcc, nvvm, runtime, CCCL, cuBLAS; about 500 MB) into $DEST" >&2
    "$PYTHON" -m pip download --no-deps --progress-bar on -d "$tmp" "${WHEELS[@]}" >&2
    rm -rf "$DEST"
    mkdir -p "$DEST"
    for w in "$tmp"/*.whl; do
        # Each wheel holds nvidia/cu13/{bin,include,lib,nvvm}; merge them into one tree.
        "$PYTHON" -m zipfile -e "$w" "$tmp/unpacked"
    done
    cp -a "$tmp/unpacked/nvidia/cu13/." "$DEST/"
    chmod +x "$DEST"/bin/* "$DEST"/nvvm/bin/* 2>/dev/null || true
    ln -sfn lib "$DEST/lib64"
    # The linker looks for the unversioned names.
    for l in cudart cublas cublasLt; do
        [[ -e "$DEST/lib/lib$l.so" ]] || ln -s "lib$l.so.13" "$DEST/lib/lib$l.so"
    done
    mkdir -p "$DEST/lib/stubs"
    echo 'void lastmile_cuda_driver_stub(void) {}' > "$tmp/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DEST/lib/stubs/libcuda.so" "$tmp/stub.c"
    touch "$DEST/.complete"
fi

if [[ "${1:-}" == "--env" ]]; then
    echo "export CUDA_HOME='$DEST'"
    echo "export CUDAToolkit_ROOT='$DEST'"
    echo "export PATH='$DEST/bin':\"\$PATH\""
else
    echo "$DEST"
fi
