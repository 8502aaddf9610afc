#!/usr/bin/env bash
# Set everything up in .venv and serve (the embedded default model unless --model is given) on localhost:8000.
# The installation runs again only when pyproject.toml changed since the last one (a stamp of its hash in the
# venv), so a start with nothing new needs no package index.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
stamp="${VIRTUAL_ENV:-.venv}/.logitserve-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${TORCH_SPEC:-torch==2.13.0}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! command -v logitserve >/dev/null; then
  bash scripts/install.sh
  echo "$want" > "$stamp"
fi
exec logitserve serve "$@"
