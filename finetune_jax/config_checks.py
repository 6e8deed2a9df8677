"""Checks on a config that catch a user's mistakes before any expensive work."""
from finetune_jax import errors
from finetune_jax import nonfinite
from finetune_jax import optim
from finetune_jax import peft  # noqa: F401  (registers the methods)
from finetune_jax import precision
from finetune_jax import tasks
from finetune_jax.models import layers
from finetune_jax.models import loading
from finetune_jax.peft import method as peft_method
from finetune_jax.peft import quantize

# Every shipped config has these keys (the CLI contract).
REQUIRED_KEYS = ('seed', 'total_steps', 'batch_size', 'learning_rate',
                 'warmup_steps', 'eval_every', 'checkpoint_every', 'pretrained',
                 'dataset', 'peft.method', 'parallel')


def _has(config, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return False
    node = node[part]
  return True


def validate(config, num_devices: int) -> None:
  """Raises one ValueError that lists every problem found, with its fix."""
  missing = [k for k in REQUIRED_KEYS if not _has(config, k)]
  if missing:
    raise ValueError(f'The config lacks required keys {missing}; add them to get_config().')
  problems = []
  required = ['pretrained', 'dataset']
  if config.task in tasks.CLASSIFICATION:
    required.append('num_classes')
  elif config.task == 'causal_lm' and config.num_classes is not None:
    problems.append('num_classes is set but causal_lm keeps the model\'s LM head '
                    '(--config.num_classes=None)')
  if config.task not in tasks.TASKS:
    problems.append(f'task={config.task!r} is unknown (one of {", ".join(tasks.TASKS)})')
  for key in required:
    if config[key] is None:
      problems.append(f'{key} is not set (--config.{key}=...)')
  for key in ('total_steps', 'batch_size', 'eval_every', 'checkpoint_every',
              'eval_batch_size', 'log_every'):
    if key in config and config[key] <= 0:
      problems.append(f'{key}={config[key]} must be positive')
  if config.warmup_steps < 0:
    problems.append(f'warmup_steps={config.warmup_steps} must be >= 0')
  if 'text' in config and config.text.max_length <= 1:
    problems.append(f'text.max_length={config.text.max_length} must be > 1')
  if config.learning_rate <= 0:
    problems.append(f'learning_rate={config.learning_rate} must be positive')
  accum = config.get('grad_accum_steps', 1)
  if accum < 1:
    problems.append(f'grad_accum_steps={accum} must be >= 1')
  elif config.batch_size % (num_devices * accum):
    times = f' x grad_accum_steps={accum}' if accum > 1 else ''
    problems.append(f'batch_size={config.batch_size} must be divisible by the {num_devices} '
                    f'devices (parallel={config.parallel!r}){times}')
  if 'eval_batch_size' in config and config.eval_batch_size % num_devices:
    problems.append(f'eval_batch_size={config.eval_batch_size} must be divisible by the '
                    f'{num_devices} devices (parallel={config.parallel!r})')
  if config.get('remat', 'none') not in layers.REMAT_MODES:
    problems.append(f'remat={config.remat!r} is unknown (one of {", ".join(layers.REMAT_MODES)})')
  if config.get('precision', 'float32') not in precision.PRECISIONS:
    problems.append(f'precision={config.precision!r} is unknown (one of '
                    f'{", ".join(precision.PRECISIONS)})')
  if config.get('head_learning_rate') is not None and config.head_learning_rate <= 0:
    problems.append(f'head_learning_rate={config.head_learning_rate} must be positive (or None: '
                    'learning_rate)')
  if not 0 <= config.get('label_smoothing', 0.0) < 1:
    problems.append(f'label_smoothing={config.label_smoothing} must be in [0, 1)')
  if config.get('grad_clip_norm', 0.0) < 0:
    problems.append(f'grad_clip_norm={config.grad_clip_norm} must be >= 0 (0 turns it off)')
  if config.task == 'image_classification' and (config.get('image_size') is not None
                                                and config.image_size <= 0):
    problems.append(f'image_size={config.image_size} must be positive')
  if config.get('max_to_keep', 1) < 1:
    problems.append(f'max_to_keep={config.max_to_keep} must be >= 1')
  if 'optimizer' in config and config.optimizer.name not in optim.OPTIMIZERS:
    problems.append(f'optimizer.name={config.optimizer.name!r} is unknown (one of '
                    f'{", ".join(optim.OPTIMIZERS)})')
  if config.get('schedule', 'cosine') not in optim.SCHEDULES:
    problems.append(f'schedule={config.schedule!r} is unknown (one of '
                    f'{", ".join(optim.SCHEDULES)})')
  problems += _peft_problems(config)
  try:
    loading.compile_patterns(config.get('dont_load', ()))
  except ValueError as e:
    problems.append(str(e).rstrip('.'))
  if config.get('nonfinite', 'stop') not in nonfinite.POLICIES:
    problems.append(f'nonfinite={config.nonfinite!r} is unknown (one of '
                    f'{", ".join(nonfinite.POLICIES)})')
  if config.get('nonfinite_max_skips', 1) < 1:
    problems.append(f'nonfinite_max_skips={config.nonfinite_max_skips} must be >= 1')
  if config.peft.method == 'lp_ft' and config.peft.lp_ft.probe_steps >= config.total_steps:
    problems.append(f'peft.lp_ft.probe_steps={config.peft.lp_ft.probe_steps} leaves no step of '
                    f'fine-tuning in total_steps={config.total_steps}; make it smaller')
  if config.get('keep_best') and not config.get('validation_examples'):
    problems.append('keep_best selects on validation metrics, but validation_examples=0 holds '
                    'none out (--config.validation_examples=0.1, for example)')
  if problems:
    raise errors.ConfigError('config', 'Invalid config: ' + '; '.join(problems) + '.')


def _peft_problems(config) -> list[str]:
  """The chosen method's own options, and the quantized base's, as far as they can be
  checked before the model loads."""
  problems = []
  if config.peft.method not in peft_method.names():
    return [f'peft.method={config.peft.method!r} is unknown (one of '
            f'{", ".join(peft_method.names())})']
  for check in (peft_method.get(config.peft.method).check, quantize.check):
    try:
      check(config.peft)
    except ValueError as e:
      problems.append(str(e).rstrip('.'))
  if config.peft.method == 'partial' and config.peft.num_frozen_blocks < 0:
    problems.append(f'peft.num_frozen_blocks={config.peft.num_frozen_blocks} must be >= 0')
  return problems
