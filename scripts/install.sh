#!/usr/bin/env bash
# The one place that says how logitserve is installed: the README's commands, CI and the Dockerfile call it.
#   scripts/install.sh [EXTRAS]      e.g. scripts/install.sh test
# TORCH_SPEC picks the torch build: the default pins the CPU-tested 2.13.0; a CUDA image sets TORCH_SPEC=skip
# to keep the torch it ships (the package itself accepts any torch >= 2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install --quiet --upgrade pip
if [ "${TORCH_SPEC:-torch==2.13.0}" != "skip" ]; then
  python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ -n "$extras" ]; then
  python -m pip install --quiet -e ".[$extras]"
else
  python -m pip install --quiet -e .
fi
