"""A fuzzed front door: bad configs, datasets, weight files and paths through the real CLI
(and load_pretrained). Each must exit non-zero with one clear line that names the fix (no
traceback), before any XLA compile, leaving the workdir exactly as it was.

The CLI runs fork from one server that has the libraries imported (cli_forks.py), so a
case costs tens of milliseconds rather than seconds.
"""
import hashlib
import json
import os
import re
import shutil
import zipfile

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from cli_forks import CliForks
from test_main import TINY

SMOKE = ['--config=configs/default.py:smoke', *TINY]
# The programs JAX compiles to put a host array on a device (jnp.asarray) and to make a PRNG
# key: loading weights needs them. Any other compile before an error is work wasted.
DATA_MOVES = {'jit(stage)', 'jit(_threefry_seed)'}


@pytest.fixture(scope='module')
def cli():
  with CliForks() as forks:
    yield forks


def snapshot(path) -> dict:
  """{relative path: sha256} of every file under `path` (None if it does not exist)."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    return {'': hashlib.sha256(open(path, 'rb').read()).hexdigest()}
  return {os.path.relpath(os.path.join(root, name), path):
          hashlib.sha256(open(os.path.join(root, name), 'rb').read()).hexdigest()
          for root, _, names in os.walk(path) for name in names}


def assert_refused(cli, argv, workdir, match, module='finetune_jax.main'):
  """One `error:` line matching `match`, exit 2, no compile, the workdir untouched."""
  before = snapshot(workdir) if workdir else None
  result = cli.run(module, argv)
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert result.code == 2 and len(errors) == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert re.search(match, errors[0]), errors[0]
  assert not [p for p in result.compiled if p not in DATA_MOVES], (errors[0], result.compiled)
  assert (snapshot(workdir) if workdir else None) == before
  return errors[0]


# ------------------------------------------------------------------ configs

CONFIG_CASES = {
    # unknown keys
    'unknown key': (['--config.lerning_rate=0.1'], r'--config.lerning_rate is no config key; '
                    r'did you mean learning_rate'),
    'unknown nested key': (['--config.peft.lora.rnak=4'], r'did you mean peft.lora.rank'),
    'unknown config argument': (['--config=configs/default.py:smok'],
                                r"Unknown config argument 'smok'"),
    # wrong types
    'int as text': (['--config.total_steps=abc'], r'--config.total_steps=abc'),
    'float as text': (['--config.learning_rate=fast'], r'--config.learning_rate=fast'),
    'bool as text': (['--config.eval_before_training=maybe'], r'eval_before_training'),
    'tuple as number': (['--config.peft.method=lora', '--config.peft.lora.targets=3'],
                        r'peft.lora.targets'),
    # out of range
    'negative steps': (['--config.total_steps=-5'], r'total_steps=-5 must be positive'),
    'zero steps': (['--config.total_steps=0'], r'total_steps=0 must be positive'),
    'zero learning rate': (['--config.learning_rate=0'], r'learning_rate=0.0 must be positive'),
    'negative learning rate': (['--config.learning_rate=-0.001'], r'learning_rate=-0.001'),
    'negative head rate': (['--config.head_learning_rate=-1.0'], r'head_learning_rate'),
    'lora rank 0': (['--config.peft.method=lora', '--config.peft.lora.rank=0'],
                    r'peft.lora.rank=0 must be'),
    'lora dropout 1': (['--config.peft.method=lora', '--config.peft.lora.dropout=1.0'],
                       r'peft.lora.dropout=1.0 must be'),
    'negative dropout': (['--config.peft.method=lora', '--config.peft.lora.dropout=-0.1'],
                         r'peft.lora.dropout=-0.1 must be'),
    'batch not divisible': (['--config.batch_size=12'], r'batch_size=12 must be divisible by '
                            r'the 8 devices'),
    'zero batch': (['--config.batch_size=0'], r'batch_size=0 must be positive'),
    'eval batch not divisible': (['--config.eval_batch_size=12'], r'eval_batch_size=12'),
    'negative warmup': (['--config.warmup_steps=-1'], r'warmup_steps=-1 must be >= 0'),
    'zero accumulation': (['--config.grad_accum_steps=0'], r'grad_accum_steps=0 must be >= 1'),
    'accumulation not dividing': (['--config.batch_size=64', '--config.grad_accum_steps=3'],
                                  r'batch_size=64 must be divisible .* grad_accum_steps=3'),
    'label smoothing 1.5': (['--config.label_smoothing=1.5'], r'label_smoothing=1.5'),
    'negative clip norm': (['--config.grad_clip_norm=-1.0'], r'grad_clip_norm=-1.0'),
    'zero image size': (['--config.image_size=0'], r'image_size=0 must be positive'),
    'zero log cadence': (['--config.log_every=0'], r'log_every=0 must be positive'),
    'zero checkpoints kept': (['--config.max_to_keep=0'], r'max_to_keep=0 must be'),
    'zero max skips': (['--config.nonfinite_max_skips=0'], r'nonfinite_max_skips=0'),
    'frozen blocks negative': (['--config.peft.num_frozen_blocks=-1'], r'num_frozen_blocks=-1'),
    'frozen blocks too many': (['--config.peft.num_frozen_blocks=99'], r'num_frozen_blocks=99'),
    'bad regex': (["--config.dont_load=('[unclosed',)"], r'not a valid regex'),
    # unknown choices
    'unknown method': (['--config.peft.method=magic'], r'magic'),
    'unknown remat': (['--config.remat=sometimes'], r"remat='sometimes' is unknown"),
    'unknown precision': (['--config.precision=fp8'], r"precision='fp8' is unknown"),
    'unknown nonfinite policy': (['--config.nonfinite=ignore'], r"nonfinite='ignore'"),
    'unknown parallel': (['--config.parallel=tpu'], r'tpu'),
    'unknown task': (['--config.task=segmentation'], r"task='segmentation' is unknown"),
    'unknown optimizer': (['--config.optimizer.name=adagrad'], r'adagrad'),
    'unknown schedule': (['--config.schedule=triangle'], r'triangle'),
    'mesh not dividing': (['--config.parallel=fsdp', '--config.mesh.data=3'], r'mesh'),
    # contradictions
    'keep_best without validation': (['--config.keep_best=true'],
                                     r'keep_best selects on validation'),
    'probe longer than the run': (['--config.peft.method=lp_ft',
                                   '--config.peft.lp_ft.probe_steps=6'],
                                  r'probe_steps=6 leaves no step'),
    'quantized base, full training': (['--config.peft.method=full',
                                       '--config.peft.quantize_base=nf4'], r'quantize_base'),
    'classes for a causal LM': (['--config.task=causal_lm'], r'num_classes is set but '
                                r'causal_lm'),
    'validation beyond train': (['--config.validation_examples=999999'],
                                r'validation_examples=999999'),
    'subset beyond train': (['--config.train_examples=999999'], r'train_examples=999999'),
    'text task on images': (['--config.task=text_classification'],
                            r"mnist5k' has no 'text' field .* task=text_classification"),
    # missing things
    'missing config file': (['--config=configs/nope.py'], r'configs/nope.py'),
    'unknown model': (['--config.pretrained=resnet-9000'], r"Unknown model 'resnet-9000'"),
    'unknown dataset': (['--config.dataset=imagenet-42'], r'imagenet-42'),
    'misspelt dataset': (['--config.dataset=fashion_mnits'], r'fashion_mnits.*fashion_mnist'),
}


@pytest.mark.parametrize('flags, match', CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_configs(cli, tmp_path, flags, match):
  workdir = str(tmp_path / 'run')
  assert_refused(cli, [*SMOKE, f'--workdir={workdir}', *flags], workdir, match)


def test_verbose_shows_the_traceback(cli, tmp_path):
  result = cli.run('finetune_jax.main', [*SMOKE, f'--workdir={tmp_path / "run"}',
                                         '--config.dataset=fashion_mnits', '--verbose'])
  assert result.code != 0 and 'Traceback' in result.stderr and 'fashion_mnist' in result.stderr
  assert not (tmp_path / 'run').exists()


def test_missing_workdir_flag(cli):
  assert_refused(cli, SMOKE, None, r'--workdir must have a value')


# Fields that must be positive, and values hypothesis picks around and below zero.
POSITIVE = ('total_steps', 'batch_size', 'eval_every', 'checkpoint_every', 'log_every',
            'eval_batch_size')


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(field=st.sampled_from(POSITIVE), value=st.integers(-10**9, 0),
                  lr=st.floats(max_value=0.0, allow_nan=False, allow_infinity=False))
def test_any_non_positive_count_or_rate(cli, tmp_path, field, value, lr):
  workdir = str(tmp_path / 'run')
  line = assert_refused(cli, [*SMOKE, f'--workdir={workdir}', f'--config.{field}={value}',
                              f'--config.learning_rate={lr}'], workdir, field)
  assert f'learning_rate={lr} must be positive' in line  # every problem at once


# ------------------------------------------------------------------- paths

def test_a_workdir_that_is_a_file(cli, tmp_path):
  workdir = tmp_path / 'run'
  workdir.write_text('not a directory')
  assert_refused(cli, [*SMOKE, f'--workdir={workdir}'], str(workdir), r'is a file')


def test_a_workdir_that_cannot_be_created(cli, tmp_path):
  parent = tmp_path / 'file'
  parent.write_text('x')
  workdir = str(parent / 'run')
  assert_refused(cli, [*SMOKE, f'--workdir={workdir}'], str(parent), r'cannot be created')


def test_a_workdir_holding_another_run(cli, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = {'pretrained': 'efficientnet-lite0', 'dataset': 'mnist5k', 'num_classes': 10}
  (workdir / 'config.json').write_text(json.dumps(config))
  (workdir / 'metrics.jsonl').write_text('{"step": 3, "split": "train"}\n')
  assert_refused(cli, [*SMOKE, f'--workdir={workdir}'], str(workdir),
                 r'holds a run with an incompatible config .*pretrained')


def test_an_adapter_made_for_another_base_model(cli, tmp_path):
  adapter = tmp_path / 'adapter'
  adapter.mkdir()
  (adapter / 'adapter_config.json').write_text(json.dumps(
      {'peft_type': 'LORA', 'base_model_name_or_path': 'bert-base-uncased', 'r': 4,
       'lora_alpha': 8, 'target_modules': ['query', 'value']}))
  from safetensors.numpy import save_file
  save_file({'base_model.model.encoder.layer.0.attention.self.query.lora_A.weight':
             np.zeros((4, 768), np.float32)}, str(adapter / 'adapter_model.safetensors'))
  workdir = str(tmp_path / 'run')
  assert_refused(cli, [*SMOKE, f'--workdir={workdir}', '--config.peft.method=lora',
                       f'--config.peft.init_from={adapter}'], workdir, str(adapter))


# ---------------------------------------------------------------- datasets

def _image(path, size=(12, 12)):
  from PIL import Image
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full(size + (3,), 99, np.uint8)).save(path)


def _folder_cases(root):
  (root / 'empty').mkdir()
  for label in ('cat', 'dog', 'emu'):
    for i in range(4):
      _image(root / 'three' / 'train' / label / f'{i}.png')
      _image(root / 'three' / 'test' / label / f'{i}.png')
  for label in ('cat', 'dog'):
    for i in range(4):
      _image(root / 'corrupt' / 'train' / label / f'{i}.png')
      _image(root / 'corrupt' / 'test' / label / f'{i}.png')
  (root / 'corrupt' / 'train' / 'dog' / 'bad.png').write_text('I am not a PNG')


DATA_CASES = {
    'unprepared dataset': (lambda root: ['--config.dataset=fortunes',
                                         f'--config.data_dir={root / "empty_tfds"}'],
                           r"fortunes.* not prepared"),
    'empty folder': (lambda root: [f'--config.dataset=folder:{root / "empty"}',
                                   f'--config.data_dir={root / "tfds"}'], r'is empty'),
    'labels beyond num_classes': (lambda root: [f'--config.dataset=folder:{root / "three"}',
                                                f'--config.data_dir={root / "tfds"}',
                                                '--config.num_classes=2'],
                                  r'num_classes=2 but dataset .* has 3 classes'),
    'corrupt image': (lambda root: [f'--config.dataset=folder:{root / "corrupt"}',
                                    f'--config.data_dir={root / "tfds"}',
                                    '--config.num_classes=2'], r'bad.png'),
    'images for a language model': (lambda root: ['--config=configs/smollm2_poems.py:smoke',
                                                  '--config.pretrained=llama-tiny',
                                                  '--config.dataset=mnist5k',
                                                  '--config.image_size=32'],
                                    r"mnist5k' has no 'text' field"),
}


@pytest.mark.parametrize('make_flags, match', DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_datasets(cli, tmp_path, make_flags, match):
  _folder_cases(tmp_path)
  workdir = str(tmp_path / 'run')
  flags = make_flags(tmp_path)
  base = [] if flags[0].startswith('--config=') else SMOKE  # a case may bring its own config
  assert_refused(cli, [*base, f'--workdir={workdir}', *flags], workdir, match)


# ------------------------------------------------------------ weight files
# Through load_pretrained, the CLI's loader, in this process: a ValueError that names the
# file (the CLI prints it as its one line), before any compile.

def _weights():
  from finetune_jax.models import bert
  from finetune_jax.models import efficientnet_lite
  from finetune_jax.models import llama
  from finetune_jax.models import vgg
  return {'pth': efficientnet_lite._lite0_weights(), 'h5': vgg._hed_weights(),
          'gguf': llama.smollm2_path(), 'hf_dir': bert.minilm_dir()}


def _npz(path):
  from finetune_jax import models
  from finetune_jax.models.vit import convert as convert_vit
  tiny = models.load_pretrained('vit-tiny', num_classes=3)
  convert_vit.params_to_npz(tiny.params, path, num_heads=tiny.config['num_heads'])


def _copy(kind, tmp_path):
  """A copy of a real (or, for npz, a tiny) checkpoint; the path load_pretrained takes and
  the file in it to damage."""
  if kind == 'npz':
    path = tmp_path / 'vit.npz'
    _npz(path)
    return path, path
  if kind == 'zip_pth':  # the real file is torch's legacy format; this is its zip format
    import torch
    path = tmp_path / 'lite0_zip.pth'
    torch.save(torch.load(_weights()['pth'], weights_only=True), path)
    return path, path
  source = _weights()['pth' if kind == 'pth' else kind]
  if kind == 'hf_dir':
    shutil.copytree(source, tmp_path / 'minilm')
    return tmp_path / 'minilm', tmp_path / 'minilm' / 'model.safetensors'
  path = tmp_path / os.path.basename(source)
  shutil.copyfile(source, path)
  return path, path


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) * 2 // 3)


def _flip(offset):
  """Flips one bit at `offset` (negative: from the end; a float: that fraction in)."""
  def flip(path):
    size = os.path.getsize(path)
    at = int(size * offset) if isinstance(offset, float) else offset % size
    with open(path, 'r+b') as f:
      f.seek(at)
      byte = f.read(1)
      f.seek(at)
      f.write(bytes([byte[0] ^ 0x04]))
  return flip


# Where a flipped bit is caught: zip members (.npz, zip-format .pth) carry CRC-32s, so
# anywhere in the data; legacy .pth, safetensors, GGUF and HDF5 have no checksum of their
# data (a flipped mantissa bit there loads as a slightly different weight; README,
# Reliability), so in their headers.
WEIGHT_CASES = {
    'truncated pth': ('pth', _truncate), 'truncated h5': ('h5', _truncate),
    'truncated gguf': ('gguf', _truncate), 'truncated safetensors': ('hf_dir', _truncate),
    'truncated npz': ('npz', _truncate),
    'bit-flipped pth': ('pth', _flip(3)), 'bit-flipped zip pth': ('zip_pth', _flip(0.5)),
    'bit-flipped npz': ('npz', _flip(0.5)),
    'bit-flipped h5': ('h5', _flip(0)), 'bit-flipped gguf': ('gguf', _flip(1)),
    'bit-flipped safetensors': ('hf_dir', _flip(12)),
}


@pytest.fixture
def compiles():
  import jax
  names = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *a, fun_name='?', **k: names.append(fun_name)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  yield names
  jax.monitoring.clear_event_listeners()


def assert_load_refused(path, match, compiles, **kwargs):
  from finetune_jax import models
  with pytest.raises(ValueError, match=match) as error:
    models.load_pretrained(str(path), **kwargs)
  assert '\n' not in str(error.value).strip() or 'Traceback' not in str(error.value)
  assert not [p for p in compiles if p not in DATA_MOVES], compiles
  return str(error.value)


@pytest.mark.parametrize('kind, damage', WEIGHT_CASES.values(), ids=WEIGHT_CASES.keys())
def test_damaged_weight_files(tmp_path, kind, damage, compiles):
  path, target = _copy(kind, tmp_path)
  damage(target)
  before = snapshot(tmp_path)
  message = assert_load_refused(path, re.escape(str(target.name)), compiles)
  assert snapshot(tmp_path) == before, message


def test_a_file_of_no_known_architecture(tmp_path, compiles):
  np.savez(tmp_path / 'mystery.npz', w=np.zeros((3, 3), np.float32))
  assert_load_refused(tmp_path / 'mystery.npz', r'holds no architecture this project reads',
                      compiles)


def test_a_pickle_that_runs_code_never_runs(tmp_path, compiles):
  sentinel = tmp_path / 'pwned'

  class Exploit:
    def __reduce__(self):
      return (os.system, (f'touch {sentinel}',))

  import pickle
  path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(path, 'w') as archive:  # torch's layout: archive/data.pkl
    archive.writestr('evil/data.pkl', pickle.dumps({'w': Exploit()}, protocol=2))
    archive.writestr('evil/version', '3\n')
  assert_load_refused(path, r'evil.pth', compiles)
  assert not sentinel.exists()


def test_an_npz_of_objects_is_refused_not_unpickled(tmp_path, compiles):
  path = tmp_path / 'objects.npz'
  np.savez(path, w=np.array([{'a': 1}, None], dtype=object))
  assert_load_refused(path, r'objects.npz', compiles)


def test_a_tokenizer_that_does_not_fit_the_vocabulary(tmp_path, compiles):
  model_dir, _ = _copy('hf_dir', tmp_path)
  config = json.loads((model_dir / 'config.json').read_text())
  config['vocab_size'] = 1000  # the embedding; tokenizer.json has 30522 tokens
  (model_dir / 'config.json').write_text(json.dumps(config))
  assert_load_refused(model_dir, r'tokenizer .* 30522 .* 1000', compiles)
