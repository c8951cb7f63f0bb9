#!/usr/bin/env bash
# Installs everything from scratch (see setup.sh) and runs the test suite, real-model tests included, on the lowest
# supported versions (.venv); then the fast part of the suite on the newest releases (.venv-latest), so that a new
# release of transformers, TRL, PEFT, accelerate or datasets that breaks the package shows at once.
# Arguments go to the first pytest run. TRL_ICA_LATEST=0 skips the second.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1
.venv/bin/python -m ruff check trl_ica tests scripts benchmarks
.venv/bin/python -m ruff format --check trl_ica tests scripts benchmarks
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ "${TRL_ICA_LATEST:-1}" != 0 ]; then
    VENV=.venv-latest VERSIONS=latest bash scripts/setup.sh
    # DeepSpeed ships as source that builds against the installed torch (tests/test_deepspeed.py runs here only).
    .venv-latest/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation "deepspeed>=0.19"
    .venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|deepspeed)=='
    .venv-latest/bin/python -m pytest -q -p no:cacheprovider -m "not slow"
fi
