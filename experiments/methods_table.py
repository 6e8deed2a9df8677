r"""A markdown table of fine-tuning runs, one row per workdir, from their results.json.

  python experiments/methods_table.py runs/methods/minilm_*

Each row: the method, what trains (count and share of all params), the
optimizer state, the final eval metrics, steps, throughput and wall time, as
the trainer wrote them. Workdirs without a results.json (unfinished runs)
are listed as such, not skipped silently.
"""
import json
import os
import sys

METRICS = ('eval_accuracy', 'eval_macro_f1', 'eval_perplexity', 'eval_loss')


def row(workdir: str) -> str:
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return f'| `{os.path.basename(workdir)}` | unfinished (no results.json) |||||||'
  with open(path) as f:
    r = json.load(f)
  final = r.get('final', {})
  metrics = ', '.join(f'{k[5:]} {final[k]:.4g}' for k in METRICS if k in final)
  return (f"| `{r['method']}` | {r['trainable_params']:,} ({r['trainable_percent']:.3g}%) | "
          f"{r['optimizer_state_bytes'] / 2**20:.3g} MiB | {metrics} | {r['steps']} | "
          f"{r['train_examples_per_sec']:.3g} | {r['wall_s']:.0f} s |")


def main(workdirs) -> None:
  if not workdirs:
    sys.exit('Name the run workdirs: python experiments/methods_table.py runs/methods/*')
  print('| method | trainable params | optimizer state | final eval | steps | train ex/s | wall |')
  print('|---|---|---|---|---|---|---|')
  for workdir in sorted(w for w in workdirs if os.path.isdir(w)):
    print(row(workdir))


if __name__ == '__main__':
  main(sys.argv[1:])
