"""Fine-tunes a pretrained model as a config says.

  python -m finetune_jax.main --config configs/default.py --workdir runs/default \
      [--config.<key>=<value> ...]

Running the same command again on the same workdir resumes from the latest
checkpoint, or ends at once if the run had finished.
"""
import ctypes
import json
import logging as std_logging
import os
import shlex
import sys


def cap_malloc_arenas(arenas: int = 2) -> None:
  """Caps glibc's malloc arenas, as MALLOC_ARENA_MAX=2 would (where that is unset).

  glibc gives threads their own arenas, up to 8 per core, and returns little of them: with a
  reader thread per input pipeline, eval pass and checkpoint write, a long run's resident
  memory then creeps up for thousands of steps. Capped, it is flat after warm-up (README,
  Reliability: the soak).
  """
  if os.environ.get('MALLOC_ARENA_MAX') or not sys.platform.startswith('linux'):
    return
  try:
    ctypes.CDLL('libc.so.6').mallopt(-8, arenas)  # -8: M_ARENA_MAX
  except (OSError, AttributeError):  # not glibc
    pass


# Before the imports below start threads (TensorFlow's, grain's, JAX's), so theirs are capped too.
cap_malloc_arenas()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from finetune_jax import cli  # noqa: E402
from finetune_jax import distributed  # noqa: E402
from finetune_jax import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
config_flags.DEFINE_config_file(
    'config', None, 'A configs/<name>.py file, optionally with :<arg>.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  """Orbax logs every save step at INFO; keep its warnings only."""
  return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def use_compilation_cache(directory: str) -> None:
  """Keeps compiled programs in `directory` for later runs (JAX's persistent cache).

  Set before the first compile; $JAX_COMPILATION_CACHE_DIR, where set, wins.
  """
  if directory and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(directory))
    # Programs that compile in under a second are cheaper to compile than to read back.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


# What remat and a quantized base's recomputed dequantization need of XLA:CPU (README, Memory):
# its memory-optimised scheduler, not the default that favours concurrency; and the
# optimisation barriers of jax.checkpoint kept, which XLA:CPU otherwise expands away, after
# which CSE merges each recomputation back into the forward pass.
REMAT_XLA_FLAGS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',
                   '--xla_disable_hlo_passes=cse_barrier_expander')


def xla_flags(config) -> None:
  """Sets the XLA flags a config needs in $XLA_FLAGS, which JAX reads when it starts."""
  flags_now = os.environ.get('XLA_FLAGS', '')
  if config.remat != 'none' or config.peft.quantize_base != 'none':  # both recompute
    missing = [f for f in REMAT_XLA_FLAGS if f.split('=')[0] not in flags_now]
    os.environ['XLA_FLAGS'] = ' '.join([flags_now, *missing]).strip()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  xla_flags(FLAGS.config)  # before the first use of a device starts JAX's backend
  distributed.initialize(FLAGS.config)
  use_compilation_cache(FLAGS.config.compilation_cache_dir)
  logging.info('JAX devices: %s', jax.local_devices())
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if 'preempted_at' in results:
    print(f'Stopped at step {results["preempted_at"]} with a checkpoint saved. To resume, run the '
          f'same command again: python -m finetune_jax.main {shlex.join(sys.argv[1:])}',
          file=sys.stderr)
    sys.exit(results['exit_code'])
  print(json.dumps({'final': results['final'], 'steps': results['steps'],
                    'wall_s': round(results['wall_s'], 1)}))


if __name__ == '__main__':
  cli.run(main)
