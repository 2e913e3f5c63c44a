#!/usr/bin/env bash
# Runs every test: installs etcd, bubblewrap and python3 if missing (see below), builds
# the workspace once (release), fetches the default model, installs the Python SDK test
# dependencies into .venv, then runs the Rust tests, the CUDA kernel checks (with the CUDA
# compilers fetched from PyPI) and the SDK tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# How long each phase took, printed as it ends and summed up at the exit (pass or fail).
phase_start=$SECONDS
phases=()
phase() {
    local took=$((SECONDS - phase_start))
    phases+=("$(printf '%-34s %4d s' "$1" "$took")")
    echo "== $1: ${took} s"
    phase_start=$SECONDS
}
report() {
    echo "== time per phase"
    for p in "${phases[@]}"; do echo "   $p"; done
    echo "   total                              $SECONDS s"
}
trap report EXIT

# Debian packages the tests need: etcd (discovery tests start a real one), bubblewrap (the
# sandbox backend) and a python3 under /usr (what sandboxes run; the host's /usr is their root).
missing=()
if ! command -v etcd >/dev/null 2>&1 && [ -z "${LASTMILE_ETCD:-}" ]; then missing+=(etcd-server); fi
if ! command -v bwrap >/dev/null 2>&1; then missing+=(bubblewrap); fi
# Sandbox internet access (--sandbox-egress): a user-mode network and a filter inside it.
if ! command -v slirp4netns >/dev/null 2>&1; then missing+=(slirp4netns); fi
if ! command -v nft >/dev/null 2>&1 && [ ! -x /usr/sbin/nft ]; then missing+=(nftables); fi
if [ ! -x /usr/bin/python3 ]; then missing+=(python3); fi
# npm installs the MCP test clients (tests/mcp-tools), which bring their own Node.js 22.
if ! command -v npm >/dev/null 2>&1; then missing+=(npm); fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]} (Debian packages)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# slirp4netns opens /dev/net/tun as the unprivileged user sandboxes run as: give it the usual
# mode (Debian's udev default) where a minimal image left it root-only.
if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
    if [ "$(id -u)" = 0 ]; then chmod 0666 /dev/net/tun; else sudo chmod 0666 /dev/net/tun; fi
fi

phase "system packages"
cargo build --release --workspace
phase "build (release)"
./target/release/lastmile models pull

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
# The MCP conformance suite and Inspector CLI, pinned by tests/mcp-tools/package-lock.json.
if ! cmp -s tests/mcp-tools/package-lock.json tests/mcp-tools/node_modules/.installed-lock.json; then
    npm ci --prefix tests/mcp-tools --no-audit --no-fund --loglevel=error
    cp tests/mcp-tools/package-lock.json tests/mcp-tools/node_modules/.installed-lock.json
fi
phase "model, Python and npm packages"

cargo test --release --workspace
phase "Rust tests"
# The engine's batching, caching and speculation guarantees again on the AVX2 kernels (what an
# AVX2-only CPU runs), forced here wherever the CPU has more (AVX-VNNI's variant of them is
# checked against them, sum for sum, by the kernels' unit tests).
LASTMILE_NO_AVX512=1 LASTMILE_NO_AVXVNNI=1 cargo test --release -p lastmile-engine --test batching \
    --test prefix_cache --test speculation --test correctness --test scheduling
phase "Rust engine tests, AVX2 tier"
# The GPU path cannot run here (no GPU), so it is kept from rotting: the `cuda` feature builds,
# every kernel of ours compiles through NVRTC for sm_90 (the lent H100/H200s) and assembles with
# ptxas, and the device probe says "no CUDA device" cleanly. The compilers come from PyPI.
eval "$(scripts/cuda/toolchain.sh --env)"
LASTMILE_REQUIRE_PTXAS=1 cargo test --release -p lastmile-engine --features cuda --test cuda
# And the binary with the feature (`serve --device cuda`) type-checks.
cargo check --release -p lastmile --features cuda
phase "CUDA kernels (NVRTC, ptxas sm_90)"
.venv/bin/python -m pytest -q tests/python
phase "Python tests"
