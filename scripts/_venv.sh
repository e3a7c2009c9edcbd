# Sourced by the set-up scripts: creates .venv once and installs gradprobe with the given extras,
# always under constraints.txt (which pins the CPU build of torch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="$1"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
stamp=".venv/.gradprobe-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip -c constraints.txt >/dev/null 2>&1 || true
    .venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
