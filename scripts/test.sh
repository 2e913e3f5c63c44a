#!/usr/bin/env bash
# Runs every test: builds the workspace once (release), fetches the default model, installs the
# Python SDK test dependencies into .venv, then runs the Rust tests and the SDK tests.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace
./target/release/lastmile models pull

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

cargo test --release --workspace
.venv/bin/python -m pytest -q tests/python
