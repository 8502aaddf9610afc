#!/usr/bin/env bash
# Set everything up in .venv and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
bash scripts/install.sh test
exec python -m pytest -q "$@"
