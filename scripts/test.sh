#!/usr/bin/env bash
# Installs everything from scratch (see setup.sh) and runs the test suite, real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1
.venv/bin/python -m ruff check trl_ica tests scripts
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
