#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install proca-sync with its PostgreSQL, pipeline, workers and web extras and the
# dev tools. Idempotent; sourced by the other scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pick_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

if [ ! -x .venv/bin/python ]; then
  PY=$(pick_python) || {
    echo "proca-sync needs Python >= 3.11; installing it from Debian's packages" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
    PY=$(pick_python) || { echo "error: no Python >= 3.11 available" >&2; exit 2; }
  }
  "$PY" -m venv .venv || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && "$PY" -m venv .venv
  }
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[postgres,pipeline,workers,web]' --group dev
  rm -f .venv/.installed-* && touch "$stamp"
fi
