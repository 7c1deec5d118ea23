#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install jaxlin with its pinned dependencies.
# Finds Python 3.12+ by itself: $PYTHON, python3.13/python3.12 on PATH, or pyenv's installs.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  # Prefer 3.12 (the GPU machine's version), then any newer 3.x.
  local candidates=()
  [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
  local roots=("$HOME/.pyenv")
  command -v pyenv >/dev/null 2>&1 && roots=("$(pyenv root)" "${roots[@]}")
  for minor in 12 13 14; do
    candidates+=("python3.$minor")
    for r in "${roots[@]}"; do
      for d in "$r"/versions/3."$minor".*; do [ -x "$d/bin/python" ] && candidates+=("$d/bin/python"); done
    done
  done
  candidates+=(python3)
  for c in "${candidates[@]}"; do
    # pyenv shims exist for every installed version but fail unless it is selected: test by running.
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
      "$c" -c 'import sys; print(sys.executable)'; return 0
    fi
  done
  echo "error: jaxlin needs Python >= 3.12 and found none. Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
  return 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)'; then
  rm -rf .venv
  "$(find_python)" -m venv .venv
fi
stamp=.venv/.jaxlin-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]" 2> >(grep -v "is ignored: it is neither" >&2)
  touch "$stamp"
fi
