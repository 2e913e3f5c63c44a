#!/usr/bin/env bash
# Runs every test: installs etcd if it is missing (the discovery tests start a real one), builds
# the workspace once (release), fetches the default model, installs the Python SDK test
# dependencies into .venv, then runs the Rust tests and the SDK tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v etcd >/dev/null 2>&1 && [ -z "${LASTMILE_ETCD:-}" ]; then
    echo "== installing etcd (Debian package etcd-server)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server >/dev/null
fi

cargo build --release --workspace
./target/release/lastmile models pull

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

cargo test --release --workspace
.venv/bin/python -m pytest -q tests/python
