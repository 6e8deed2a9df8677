"""Exports a run's trained model for the PyTorch ecosystem, or its adapter alone.

  python -m finetune_jax.export --workdir <run> --format {peft,merged,adapter} --out <dir>

  peft     HF PEFT: adapter_config.json + adapter_model.safetensors (LoRA, DoRA, IA3,
           prompt tuning, prefix tuning but not on BERT), a trained head as
           modules_to_save; load it with
           peft.PeftModel.from_pretrained(<the base model in transformers>, <dir>).
  merged   a transformers model dir (config.json + model.safetensors, tokenizer,
           preprocessor config) with the LoRA/DoRA updates or IA3 vectors folded in; any
           method whose params are the plain model exports too (prompts and
           prefixes do not fold into weights: they have none).
  adapter  the trainable params alone under our param paths (adapter.json +
           adapter.safetensors), for `--config.peft.init_from` here.

The model is rebuilt from the workdir's config.json exactly as training
built it (train.build_model), and the trainable params come from the latest
checkpoint (or --step): frozen params are reloaded from `pretrained`, and
the run's peft.init_from adapter, where it still exists, is loaded first as in
training (an HF IA3 vector for GPT-2's c_attn can change a param's shape).
"""
import json
import os

from absl import app
from absl import flags
from absl import logging
import ml_collections

from finetune_jax import checkpoint
from finetune_jax import cli
from finetune_jax import train
from finetune_jax.peft import hf_format
from finetune_jax.peft import paths

FORMATS = ('peft', 'merged', 'adapter')

FLAGS = flags.FLAGS


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ValueError(f'{workdir} holds no config.json: it is not a run directory. Point '
                     '--workdir at the workdir a finetune_jax.main run wrote.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore(workdir: str, config, step: int | None = None, best: tuple | None = None):
  """(model, adapted, trained params, step): the run's model with its checkpoint.

  best: keep_best's (metric, higher_is_better), to read the best checkpoint instead.
  """
  name = checkpoint.BEST_DIR if best else 'checkpoints'
  checkpoints = os.path.join(workdir, name)
  if best and not os.path.isdir(checkpoints):
    raise ValueError(f'{workdir} has no {name}/: --best needs a run trained with '
                     '--config.keep_best=True (and validation_examples).')
  if not os.path.isdir(checkpoints) or not any(d.isdigit() for d in os.listdir(checkpoints)):
    raise ValueError(f'{workdir} has no finished checkpoint in {name}/ yet; use a run after its '
                     'first checkpoint (config.checkpoint_every steps).')
  model, adapted = train.build_model(config, missing_adapter_ok=True)
  like, frozen, _ = train.initial_state(config, model, adapted)
  ckpt = checkpoint.Checkpointer(workdir, config.max_to_keep, best=best)
  try:
    step = (ckpt.best_step() if best else ckpt.latest_step()) if step is None else step
    state = ckpt.restore(like, step)
  finally:
    ckpt.close()
  return model, adapted, paths.join(state['trainable'], frozen), int(state['step'])


def export(workdir: str, fmt: str, out: str, step: int | None = None) -> str:
  """Writes `workdir`'s model in format `fmt` to `out`; returns `out`."""
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r}; use one of {FORMATS}.')
  config = read_config(workdir)
  method = config.peft.method
  model, adapted, params, step = restore(workdir, config, step)
  if fmt == 'peft':
    hf_format.save_peft(model, adapted, params, out, method=method,
                        base_model=config.pretrained)
  elif fmt == 'merged':
    hf_format.save_merged(model, adapted, params, out, method=method)
  else:
    hf_format.save_adapter(model, adapted, params, out, method=method,
                           base_model=config.pretrained)
  logging.info('Wrote %s (%s, step %d of %s).', out, fmt, step, workdir)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  export(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.step)
  print(json.dumps({'out': FLAGS.out, 'format': FLAGS.format}))


if __name__ == '__main__':
  # Defined here, not at import: predict.py imports this module and has flags of its own.
  flags.DEFINE_string('workdir', None, 'A run directory (config.json + checkpoints/).')
  flags.DEFINE_enum('format', None, FORMATS, 'What to write; see the module docstring.')
  flags.DEFINE_string('out', None, 'The directory to write.')
  flags.DEFINE_integer('step', None, 'The checkpoint step to export; default: the latest.')
  flags.mark_flags_as_required(['workdir', 'format', 'out'])
  cli.run(main)
