#!/usr/bin/env bash
# Runs one config under several fine-tuning methods, each through the README's
# command, into runs/methods/<config>_<method>; then tabulates them.
#
#   experiments/run_methods.sh configs/minilm_fortunes.py prompt_tuning prefix_tuning ia3
#   experiments/run_methods.sh configs/default.py lora dora bitfit linear_probe full
#
# A finished run (results.json) is skipped and an interrupted one resumes
# from its last checkpoint, so the script can be started again at any time.
# Extra flags for every run go in FLAGS, e.g. FLAGS=--config.peft.num_frozen_blocks=4.
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1; shift
name=$(basename "$config" .py)
mkdir -p runs/methods
for method in "$@"; do
  workdir=runs/methods/${name}_${method}
  [ -f "$workdir/results.json" ] && continue
  .venv/bin/python -m finetune_jax.main --config "$config" --workdir "$workdir" \
    --config.peft.method="$method" ${FLAGS:-} >> "$workdir.log" 2>&1
done
.venv/bin/python experiments/methods_table.py runs/methods/"${name}"_*
