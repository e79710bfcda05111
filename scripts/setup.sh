#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install napari-genemap with its pinned dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
echo "setup: installing napari-genemap and its pinned dependencies into $VENV"
"$VENV/bin/pip" install -q -c requirements/constraints.txt -e ".[dev]"
