#!/usr/bin/env bash
# The benchmark's JAX side on an accelerator, in bfloat16, with MFU against a
# bfloat16 matmul timed in the same run (README, Speed). Under 8 minutes on one
# H100; the goal there is >= 50% MFU on SmolLM2 `full` at 8 x 1024 tokens.
#   bash experiments/device_bench.sh [--rounds 10] [--out device.md]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" experiments/benchmark.py --sides jax --precision bfloat16 \
  --workloads smollm2_full_8x1024,smollm2_full,smollm2_lora,minilm_full,bert_base_lora,vit_s16_lora,lite0_partial \
  "$@"
