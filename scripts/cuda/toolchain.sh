#!/usr/bin/env bash
# The CUDA 13.0 compilers lastmile's GPU kernels are checked with, from PyPI (these machines have
# no CUDA toolkit from their distribution): NVRTC (the runtime compiler the engine uses) and nvcc's
# ptxas (to assemble the PTX for a real GPU architecture). Pinned to 13.0: the lent GPU machines'
# driver is 580.x (CUDA 13.0), and newer toolkits emit PTX it may refuse.
#
#   scripts/cuda/toolchain.sh          fetch and unpack (once) into $LASTMILE_HOME/cuda-13.0
#   eval "$(scripts/cuda/toolchain.sh --env)"   ... and set PATH, LD_LIBRARY_PATH, CUDA_HOME
#
# Uses the Python at $PYTHON (default: .venv/bin/python, else python3) to run pip.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HOME_DIR="${LASTMILE_HOME:-$HOME/.cache/lastmile}"
DEST="$HOME_DIR/cuda-13.0"
WHEELS=(
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cuda-nvcc==13.0.88
)
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

if [[ ! -f "$DEST/.complete" ]]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "lastmile: fetching the CUDA 13.0 compilers (NVRTC, ptxas; about 130 MB) into $DEST" >&2
    "$PYTHON" -m pip download --no-deps --progress-bar on -d "$tmp" "${WHEELS[@]}" >&2
    rm -rf "$DEST"
    mkdir -p "$DEST"
    for w in "$tmp"/*.whl; do
        # Each wheel holds nvidia/cu13/{bin,include,lib}; merge them into one tree.
        "$PYTHON" -m zipfile -e "$w" "$tmp/unpacked"
    done
    cp -a "$tmp/unpacked/nvidia/cu13/." "$DEST/"
    chmod +x "$DEST"/bin/* 2>/dev/null || true
    # Tools that expect a toolkit's layout look in lib64.
    ln -sfn lib "$DEST/lib64"
    # The loader looks for the unversioned name too.
    [[ -e "$DEST/lib/libnvrtc.so" ]] || ln -s libnvrtc.so.13 "$DEST/lib/libnvrtc.so"
    touch "$DEST/.complete"
fi

if [[ "${1:-}" == "--env" ]]; then
    echo "export CUDA_HOME='$DEST'"
    echo "export PATH='$DEST/bin':\"\$PATH\""
    echo "export LD_LIBRARY_PATH='$DEST/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
else
    echo "$DEST"
fi
