#!/usr/bin/env bash
# Create .venv (if needed) and install ddpm-deploy with the given extras, comma-separated (default: dev; the quickstart
# takes train,export; see pyproject.toml for torch, train, export, eval, serve).
# torch is pinned to the CPU build first, so no extra pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-dev}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extra}]"
