#!/usr/bin/env bash
# Creates the Python environment that the interop tests read Delta tables with (deltalake, pyarrow), or,
# given a requirements file, another one (bench/run.sh: the benchmark peers, with MEDALLION_VENV set).
# Idempotent: reinstalls only when the requirements file changed. Prints the interpreter's path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${MEDALLION_VENV:-$HOME/.cache/medallion/venv}"
requirements="${1:-$here/requirements-python.txt}"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv" >&2
fi
if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
    echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
