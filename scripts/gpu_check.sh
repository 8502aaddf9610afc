#!/usr/bin/env bash
# CUDA checks for a lent GPU (see scripts/gpu_check.py): bf16 parity, flash varlen in use, 1B prefill throughput.
# Runs with the machine's own python3 and torch; writes the report to ${OUT:-.}/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 scripts/gpu_check.py "$@" | tee "${OUT:-.}/gpu_check.md"
