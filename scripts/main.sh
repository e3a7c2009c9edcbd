#!/usr/bin/env bash
# Creates .venv if needed, then the whole loop (scripts/headline.sh): the circles study, a deep
# sigmoid network that fails to train, its diagnosis and report, and the doctor's cure, all under
# results/ (or $GRADPROBE_OUT) with an index in its README.md.
set -euo pipefail
source "$(dirname "$0")/_venv.sh" lab
bash "$(dirname "$0")/headline.sh" "${GRADPROBE_OUT:-results}"
