#!/usr/bin/env bash
# Creates .venv if needed, installs gradprobe with its dev extras, then lints, type-checks and tests.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" dev
ruff check src tests benchmarks
mypy
python -m pytest -q "$@"
