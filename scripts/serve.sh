#!/usr/bin/env bash
# Set everything up in .venv and serve (the embedded default model unless --model is given) on localhost:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
bash scripts/install.sh
exec logitserve serve "$@"
