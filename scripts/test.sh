#!/usr/bin/env bash
# Runs every test: installs etcd, bubblewrap and python3 if missing (see below), builds
# the workspace once (release), fetches the default model, installs the Python SDK test
# dependencies into .venv, then runs the Rust tests and the SDK tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need: etcd (discovery tests start a real one), bubblewrap (the
# sandbox backend) and a python3 under /usr (what sandboxes run; the host's /usr is their root).
missing=()
if ! command -v etcd >/dev/null 2>&1 && [ -z "${LASTMILE_ETCD:-}" ]; then missing+=(etcd-server); fi
if ! command -v bwrap >/dev/null 2>&1; then missing+=(bubblewrap); fi
if [ ! -x /usr/bin/python3 ]; then missing+=(python3); fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]} (Debian packages)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --release --workspace
./target/release/lastmile models pull

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

cargo test --release --workspace
.venv/bin/python -m pytest -q tests/python
