#!/usr/bin/env bash
# Creates .venv if needed and runs the lab's headline experiment with its figures.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" lab
gradprobe lab run circles --out "${GRADPROBE_OUT:-results/circles}" "$@"
