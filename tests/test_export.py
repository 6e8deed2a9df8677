"""Export and import: HF PEFT adapters and merged transformers dirs, both ways.

Each family starts from one random transformers model saved to disk, so
ours (load_pretrained(dir)) and theirs share the base weights exactly.
"""
import copy
import json
import os
import re
import subprocess
import sys
from typing import NamedTuple

import jax
import numpy as np
import pytest
import safetensors.numpy

from finetune_jax import base_config
from finetune_jax import export
from finetune_jax import models
from finetune_jax import peft
from finetune_jax import train
from finetune_jax.models import tokenization
from finetune_jax.peft import hf_format
from finetune_jax.peft import ia3
from finetune_jax.peft import lora
from finetune_jax.peft import paths
from finetune_jax.peft import virtual_tokens
from hf_files import around_one, normal, randomise

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import minilm_fortunes  # noqa: E402  (configs/minilm_fortunes.py)

ROOT = os.path.join(os.path.dirname(__file__), '..')
TOL = 1e-4
BERT_VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(94)]


def _transformers_v5():
  import transformers
  return int(transformers.__version__.split('.')[0]) >= 5


def _randomise_torch(model, seed=0):
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_norm = ('LayerNorm' in name or 'layernorm' in name or 'ln_' in name
                 or 'norm' in name)
      if is_norm and name.endswith('weight'):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  return model.eval()


def _make_bert(path):
  from transformers import BertConfig, BertForSequenceClassification
  hf = BertForSequenceClassification(BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, num_labels=3))
  hf = _randomise_torch(hf)
  hf.save_pretrained(path)
  (path / 'vocab.txt').write_text('\n'.join(BERT_VOCAB) + '\n')
  # pooling='pooler' is what BertForSequenceClassification feeds its classifier.
  return hf, models.load_pretrained(str(path), pooling='pooler')


def _make_gpt2(path):
  from transformers import GPT2Config, GPT2LMHeadModel
  hf = _randomise_torch(GPT2LMHeadModel(GPT2Config(
      n_embd=32, n_layer=2, n_head=4, vocab_size=300, n_positions=64,
      bos_token_id=299, eos_token_id=299)))
  hf.save_pretrained(path)
  return hf, models.load_pretrained(str(path))


def _make_llama(path):
  from transformers import LlamaConfig, LlamaForCausalLM
  config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, vocab_size=260,
                       max_position_embeddings=64, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=256, eos_token_id=256)
  config._attn_implementation = 'eager'
  hf = _randomise_torch(LlamaForCausalLM(config))
  hf.save_pretrained(path)
  tokenization.byte_level_tokenizer(('<|endoftext|>',)).save(str(path / 'tokenizer.json'))
  return hf, models.load_pretrained(str(path))


def _make_vit(path):
  from transformers import ViTConfig, ViTForImageClassification
  hf = _randomise_torch(ViTForImageClassification(ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      image_size=32, patch_size=8, num_labels=3)))
  hf.save_pretrained(path)
  return hf, models.load_pretrained(str(path))


MAKERS = {'bert': _make_bert, 'gpt2': _make_gpt2, 'llama': _make_llama, 'vit': _make_vit}


@pytest.fixture(scope='module')
def zoo(tmp_path_factory):
  """family -> (torch model, its saved dir, our Pretrained of that dir)."""
  out = {}
  for family, make in MAKERS.items():
    path = tmp_path_factory.mktemp('hf') / family
    hf, ours = make(path)
    out[family] = (hf, str(path), ours)
  return out


def _inputs(family):
  rng = np.random.default_rng(0)
  if family == 'vit':
    return (rng.standard_normal((2, 32, 32, 3)).astype(np.float32),)
  vocab = {'bert': 99, 'gpt2': 300, 'llama': 260}[family]
  ids = rng.integers(5, vocab, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids)
  if family == 'bert':
    mask[1, 6:] = 0  # a padded row: the encoder masks it
  return ids, mask


def _theirs(torch_model, family, inputs):
  import torch
  with torch.no_grad():
    if family == 'vit':
      x = torch.from_numpy(np.ascontiguousarray(inputs[0].transpose(0, 3, 1, 2)))
      return torch_model(pixel_values=x).logits.numpy()
    ids, mask = (torch.from_numpy(a.astype(np.int64)) for a in inputs)
    return torch_model(input_ids=ids, attention_mask=mask).logits.numpy()


def _ours(module, params, inputs):
  return np.asarray(jax.jit(module.apply)({'params': params}, *inputs)['logits'])


def _peft_config(method='lora', **lora_kw):
  c = base_config.get_config().peft
  c.method = method
  c.lora.update(lora_kw)
  return c


def _randomise(params, seed=1):
  """Non-zero B, moved DoRA magnitudes and a new head, so every mapping shows."""
  return randomise(params, [(re.compile(f'/{lora.B}$|^head/').search, normal),
                            (re.compile(f'/{lora.MAGNITUDE}$').search,
                             lambda rng, v: v * around_one(rng, v))], seed)


def _hf_class(family):
  import transformers
  return getattr(transformers, {'bert': 'BertForSequenceClassification',
                                'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM',
                                'vit': 'ViTForImageClassification'}[family])


class _Exported(NamedTuple):
  """A run exported by save_peft, which PEFT loaded and saved back."""
  model: object
  adapted: object
  params: dict
  inputs: tuple
  ours: np.ndarray  # our logits
  out: object  # the dir save_peft wrote
  file: dict  # its tensors


def _export_to_peft(zoo, tmp_path, family, method, cfg, move, atol=0.0) -> _Exported:
  """Adapts the family's model by `cfg`, moves its params (`move`) so the adapter
  shows, and exports it: PEFT loads it with our outputs and saves back (into
  tmp_path/'resaved') the tensors we wrote, names and values (within `atol`)."""
  from peft import PeftModel
  hf, hf_path, model = zoo[family]
  adapted = peft.adapt(model, cfg)
  params = move(adapted.params)
  inputs = _inputs(family)
  ours = _ours(adapted.module, params, inputs)
  assert np.abs(ours - _theirs(hf, family, inputs)).max() > 1e-2, 'the adapter shows'

  out = tmp_path / 'peft'
  hf_format.save_peft(model, adapted, params, str(out), method=method, base_model=hf_path)
  loaded = PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
  # _theirs, less the prompt positions a decoder's prompt tuning gives logits to.
  assert np.abs(_theirs_virtual(loaded, family, method, inputs) - ours).max() <= TOL
  loaded.save_pretrained(str(tmp_path / 'resaved'))
  ours_file = safetensors.numpy.load_file(str(out / hf_format.PEFT_WEIGHTS))
  theirs_file = safetensors.numpy.load_file(str(tmp_path / 'resaved' / hf_format.PEFT_WEIGHTS))
  assert sorted(ours_file) == sorted(theirs_file)
  for key, value in ours_file.items():
    np.testing.assert_allclose(theirs_file[key], value, rtol=0, atol=atol, err_msg=key)
  return _Exported(model, adapted, params, inputs, ours, out, ours_file)


def _check_merged(exported, tmp_path, family, method):
  """save_merged's dir loads in transformers with our outputs; returns the dir."""
  merged = tmp_path / 'merged'
  hf_format.save_merged(exported.model, exported.adapted, exported.params, str(merged),
                        method=method)
  reloaded = _hf_class(family).from_pretrained(str(merged)).eval()
  assert np.abs(_theirs(reloaded, family, exported.inputs) - exported.ours).max() <= TOL
  return merged


# family, method, our options: targets include GPT-2's fused Conv1D and ViT's patch conv.
EXPORT_CASES = [
    # Not every query: target_modules lists full module names; one rank differs.
    ('bert', 'lora', dict(rank=4, alpha=8.0, targets=('layer_0/attention/self/query$', 'value$'),
                          rank_overrides=(('layer_1/.*value', 2),))),
    ('bert', 'dora', dict(rank=4, alpha=8.0, rslora=True)),
    ('gpt2', 'dora', dict(rank=4, alpha=8.0)),
    ('llama', 'lora', dict(rank=4, alpha=16.0, targets=('q_proj', 'v_proj', 'down_proj'))),
    ('vit', 'dora', dict(rank=2, alpha=4.0, targets=('attention/(query|value)$', '^embedding$'))),
]


@pytest.mark.parametrize('family, method, options', EXPORT_CASES,
                         ids=[f'{f}-{m}' for f, m, _ in EXPORT_CASES])
def test_export_loads_in_peft_and_transformers(zoo, tmp_path, family, method, options):
  exported = _export_to_peft(zoo, tmp_path, family, method, _peft_config(method, **options),
                             _randomise, atol=1e-7)
  ours_config, theirs_config = (json.loads((d / hf_format.PEFT_CONFIG).read_text())
                                for d in (exported.out, tmp_path / 'resaved'))
  for key in ('r', 'lora_alpha', 'use_dora', 'use_rslora', 'rank_pattern', 'task_type'):
    assert ours_config[key] == theirs_config[key], key
  assert sorted(ours_config['target_modules']) == sorted(theirs_config['target_modules'])

  merged = _check_merged(exported, tmp_path, family, method)
  back = models.load_pretrained(str(merged), **({'pooling': 'pooler'} if family == 'bert' else {}))
  inputs = exported.inputs
  assert np.abs(_ours(back.module, back.params, inputs) - exported.ours).max() <= TOL


def _hf_targets(family):
  if family == 'vit':
    return ['q_proj', 'v_proj'] if _transformers_v5() else ['query', 'value']
  return {'bert': ['query', 'value'], 'gpt2': ['c_attn'], 'llama': ['q_proj', 'v_proj']}[family]


def _peft_made(hf, config, path, seed, move):
  """An adapter made by HF PEFT (`config` on a copy of `hf`), each of its params
  passed as (name, tensor) to `move`, which edits it in place; saved to `path`."""
  import torch
  from peft import get_peft_model
  torch.manual_seed(seed)
  theirs = get_peft_model(copy.deepcopy(hf), config).eval()
  with torch.no_grad():
    for name, p in theirs.named_parameters():
      move(name, p)
  theirs.save_pretrained(str(path))
  return theirs


def _scale_randomly(p):
  """Each entry times a draw from [0.5, 1.5), in place."""
  import torch
  p.mul_(torch.rand_like(p) + 0.5)


IMPORT_CASES = [('bert', False), ('gpt2', True), ('llama', False), ('vit', True)]


@pytest.mark.parametrize('family, dora', IMPORT_CASES,
                         ids=[f'{f}-{"dora" if d else "lora"}' for f, d in IMPORT_CASES])
def test_peft_made_adapter_imports(zoo, tmp_path, family, dora):
  from peft import LoraConfig
  hf, _, model = zoo[family]
  head = ['classifier'] if family in ('bert', 'vit') else None
  config = LoraConfig(r=4, lora_alpha=8, target_modules=_hf_targets(family), use_dora=dora,
                      init_lora_weights=False, modules_to_save=head,
                      fan_in_fan_out=family == 'gpt2')

  def move(name, p):
    if 'lora_magnitude_vector' in name or 'modules_to_save' in name:
      _scale_randomly(p)
  theirs = _peft_made(hf, config, tmp_path, 3, move)
  inputs = _inputs(family)
  expected = _theirs(theirs, family, inputs)
  assert np.abs(expected - _theirs(hf, family, inputs)).max() > 1e-2

  adapted = peft.adapt(model, _peft_config('dora' if dora else 'lora', rank=4, alpha=8.0))
  loaded = hf_format.load_adapter(adapted, model, str(tmp_path))
  assert np.abs(_ours(loaded.module, loaded.params, inputs) - expected).max() <= TOL
  if family == 'vit' and _transformers_v5():  # transformers 4 named ViT's modules otherwise
    old = tmp_path / 'v4'
    old.mkdir()
    (old / hf_format.PEFT_CONFIG).write_text((tmp_path / hf_format.PEFT_CONFIG).read_text())
    renames = (('.layers.', '.encoder.layer.'), ('attention.q_proj', 'attention.attention.query'),
               ('attention.v_proj', 'attention.attention.value'))
    tensors = {}
    for key, value in safetensors.numpy.load_file(
        str(tmp_path / hf_format.PEFT_WEIGHTS)).items():
      for new, previous in renames:
        key = key.replace(new, previous)
      tensors[key] = value
    assert any('attention.attention.query' in k for k in tensors)
    safetensors.numpy.save_file(tensors, str(old / hf_format.PEFT_WEIGHTS))
    again = hf_format.load_adapter(adapted, model, str(old))
    for p, v in paths.flatten(loaded.params).items():
      np.testing.assert_array_equal(paths.flatten(again.params)[p], v, err_msg=p)
  # Only the adapter and the head changed.
  before, after = paths.flatten(adapted.params), paths.flatten(loaded.params)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and changed <= adapted.trainable


def test_our_adapter_format_round_trips(zoo, tmp_path):
  _, _, model = zoo['bert']
  cfg = _peft_config('lora', rank=4)
  adapted = peft.adapt(model, cfg)
  params = _randomise(adapted.params)
  hf_format.save_adapter(model, adapted, params, str(tmp_path), method='lora', base_model='x')
  saved = safetensors.numpy.load_file(str(tmp_path / hf_format.OUR_WEIGHTS))
  assert set(saved) == adapted.trainable
  loaded = hf_format.load_adapter(peft.adapt(model, cfg), model, str(tmp_path))
  for p, v in paths.flatten(params).items():
    np.testing.assert_array_equal(paths.flatten(loaded.params)[p], v, err_msg=p)
  with pytest.raises(ValueError, match=r"LoRA options \{'alpha': 16.0.*this run uses LoRA "
                     r"options \{'alpha': 4.0"):
    hf_format.load_adapter(peft.adapt(model, _peft_config(rank=4, alpha=4.0)), model,
                           str(tmp_path))
  gpt2 = zoo['gpt2'][2]
  with pytest.raises(ValueError, match=r"made for a base model whose trainable params \(bert, "
                     r"pretrained='x', method='lora'\).*this run trains \['h_0/attn"):
    hf_format.load_adapter(peft.adapt(gpt2, cfg), gpt2, str(tmp_path))


# ------------------------------------------------------------------ IA3


def _ia3_config(targets=(), feedforward=()):
  c = base_config.get_config().peft
  c.method = 'ia3'
  c.ia3.targets, c.ia3.feedforward = targets, feedforward
  return c


def _randomise_ia3(params, seed=1):
  """Vectors moved off 1 and a new head, so every mapping shows."""
  return randomise(params, [(re.compile(f'/{ia3.SCALE}$').search, around_one),
                            (re.compile('^head/').search, normal)], seed)


# Our defaults (BERT: key, value; its MLP's output.dense scaled on input) and
# a choice by hand with no feedforward module (Llama), plus ViT's renamed modules.
IA3_EXPORT_CASES = [('bert', {}), ('gpt2', {}), ('llama', dict(targets=('q_proj', 'v_proj'))),
                    ('vit', {})]


@pytest.mark.parametrize('family, options', IA3_EXPORT_CASES,
                         ids=[f for f, _ in IA3_EXPORT_CASES])
def test_ia3_export_loads_in_peft_and_transformers(zoo, tmp_path, family, options):
  exported = _export_to_peft(zoo, tmp_path, family, 'ia3', _ia3_config(**options),
                             _randomise_ia3)
  config = json.loads((exported.out / hf_format.PEFT_CONFIG).read_text())
  assert config['peft_type'] == 'IA3' and config['base_model_name_or_path'] == zoo[family][1]
  assert set(config['feedforward_modules']) <= set(config['target_modules'])
  assert config['modules_to_save'] == (['classifier'] if family in ('bert', 'vit') else None)
  if family == 'gpt2':  # PEFT saved back our c_attn vector with q's ones
    c_attn = exported.file['base_model.model.transformer.h.0.attn.c_attn.ia3_l']
    assert c_attn.shape == (96, 1) and np.all(c_attn[:32] == 1) and np.all(c_attn[32:] != 1)
  # Back through our import: the same params.
  model = exported.model
  again = hf_format.load_adapter(peft.adapt(model, _ia3_config(**options)), model,
                                 str(exported.out))
  for p, v in paths.flatten(exported.params).items():
    np.testing.assert_array_equal(paths.flatten(again.params)[p], v, err_msg=p)

  _check_merged(exported, tmp_path, family, 'ia3')


def _peft_ia3(hf, family, tmp_path, unit_q=False):
  """An IA3 adapter made and saved by HF PEFT, its vectors and head randomised."""
  from peft import IA3Config
  if family == 'bert':  # ours: the MLP's output.dense only, not attention.output.dense
    config = IA3Config(target_modules=r'.*\.(key|value|layer\.\d+\.output\.dense)',
                       feedforward_modules=r'.*\.layer\.\d+\.output\.dense',
                       modules_to_save=['classifier'])
  else:  # PEFT's defaults for GPT-2 and Llama are ours
    config = IA3Config(task_type='CAUSAL_LM', fan_in_fan_out=family == 'gpt2')

  def move(name, p):
    if 'ia3_l' in name or 'modules_to_save' in name:
      _scale_randomly(p)
    if unit_q and 'c_attn.ia3_l' in name:
      p[:p.shape[0] // 3] = 1.0
  return _peft_made(hf, config, tmp_path, 5, move)


IA3_IMPORT_CASES = [('bert', False), ('gpt2', False), ('gpt2', True), ('llama', False)]


@pytest.mark.parametrize('family, unit_q', IA3_IMPORT_CASES,
                         ids=['bert', 'gpt2-scaled-q', 'gpt2-unit-q', 'llama'])
def test_peft_made_ia3_adapter_imports(zoo, tmp_path, family, unit_q):
  hf, _, model = zoo[family]
  theirs = _peft_ia3(hf, family, tmp_path / 'peft', unit_q)
  inputs = _inputs(family)
  expected = _theirs(theirs, family, inputs)
  assert np.abs(expected - _theirs(hf, family, inputs)).max() > 1e-2

  adapted = peft.adapt(model, _ia3_config())
  loaded = hf_format.load_adapter(adapted, model, str(tmp_path / 'peft'))
  assert np.abs(_ours(loaded.module, loaded.params, inputs) - expected).max() <= TOL
  before, after = paths.flatten(adapted.params), paths.flatten(loaded.params)
  assert set(before) == set(after)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed and changed <= adapted.trainable
  if family == 'gpt2':  # q's third: dropped when all ones, else kept (HF trains it)
    assert after['h_0/attn/c_attn/ia3_scale'].shape == ((64,) if unit_q else (96,))
    # Exported back, merged and kept in our format, it is still HF's adapter.
    hf_format.save_peft(model, loaded, loaded.params, str(tmp_path / 'back'), method='ia3')
    original, back = (safetensors.numpy.load_file(str(tmp_path / d / hf_format.PEFT_WEIGHTS))
                      for d in ('peft', 'back'))
    assert sorted(original) == sorted(back)
    for key, value in original.items():
      np.testing.assert_array_equal(back[key], value, err_msg=key)
    merged = ia3.merge(loaded.module, loaded.params)
    assert np.abs(_ours(model.module, merged, inputs) - expected).max() <= TOL
    hf_format.save_adapter(model, loaded, loaded.params, str(tmp_path / 'ours'), method='ia3')
    ours = hf_format.load_adapter(peft.adapt(model, _ia3_config()), model,
                                  str(tmp_path / 'ours'))
    for p, v in after.items():
      np.testing.assert_array_equal(paths.flatten(ours.params)[p], v, err_msg=p)


class _ScaledCheckpointer:
  """A step-1 checkpoint: the params the run starts from, times 1.1."""

  def __init__(self, *args, **kwargs):
    pass

  def latest_step(self):
    return 1

  def restore(self, like, step):
    return {**like, 'step': np.int32(step),
            'trainable': jax.tree.map(lambda v: v * 1.1, like['trainable'])}

  def close(self):
    pass


def _export_run_from_start(tmp_path, monkeypatch, hf_path, peft_config):
  """A run of `peft_config` from the PEFT adapter in tmp_path/'start', one
  _ScaledCheckpointer step on, exported by export.export in the PEFT format to
  tmp_path/'out'. Returns (workdir, start's tensors, out's tensors)."""
  config = base_config.get_config()
  config.pretrained = hf_path
  config.peft = peft_config
  config.peft.init_from = str(tmp_path / 'start')
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '1').mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  monkeypatch.setattr(export.checkpoint, 'Checkpointer', _ScaledCheckpointer)
  export.export(str(workdir), 'peft', str(tmp_path / 'out'))
  start, out = (safetensors.numpy.load_file(str(tmp_path / d / hf_format.PEFT_WEIGHTS))
                for d in ('start', 'out'))
  return workdir, start, out


def test_run_from_a_peft_ia3_adapter_exports(zoo, tmp_path, monkeypatch):
  """export.restore rebuilds the run from peft.init_from as training did, so a
  whole (q|k|v) c_attn vector keeps its shape through the checkpoint."""
  hf, hf_path, _ = zoo['gpt2']
  _peft_ia3(hf, 'gpt2', tmp_path / 'start')
  _, start, out = _export_run_from_start(tmp_path, monkeypatch, hf_path, _ia3_config())
  assert sorted(start) == sorted(out)
  for key, value in start.items():
    np.testing.assert_allclose(out[key], value * 1.1, rtol=1e-6, err_msg=key)


def test_our_adapter_format_round_trips_ia3(zoo, tmp_path):
  _, _, model = zoo['bert']
  adapted = peft.adapt(model, _ia3_config())
  params = _randomise_ia3(adapted.params)
  hf_format.save_adapter(model, adapted, params, str(tmp_path), method='ia3', base_model='x')
  saved = safetensors.numpy.load_file(str(tmp_path / hf_format.OUR_WEIGHTS))
  assert set(saved) == adapted.trainable
  loaded = hf_format.load_adapter(peft.adapt(model, _ia3_config()), model, str(tmp_path))
  for p, v in paths.flatten(params).items():
    np.testing.assert_array_equal(paths.flatten(loaded.params)[p], v, err_msg=p)
  with pytest.raises(ValueError, match=r"method='ia3'.*this run trains \['layer_0/attention/"
                     r"self/query/lora_a"):
    hf_format.load_adapter(peft.adapt(model, _peft_config('lora')), model, str(tmp_path))


def test_mismatched_ia3_adapters_are_refused_by_name(zoo, tmp_path):
  bert, gpt2 = zoo['bert'][2], zoo['gpt2'][2]
  _peft_ia3(zoo['bert'][0], 'bert', tmp_path)
  cases = [
      (bert, _ia3_config(targets=('query', 'value')),
       r"scales the outputs of \['layer_\*/attention/self/key', 'layer_\*/attention/self/"
       r"value'\] and the inputs of \['layer_\*/output/dense'\]; this run scales the outputs "
       r"of \['layer_\*/attention/self/query', 'layer_\*/attention/self/value'\] "
       r"\(peft.ia3.targets\) and the inputs of \[\] \(peft.ia3.feedforward\), unlike "
       r"the adapter at \['layer_0/attention/self/key', .*\]\. Set "
       r"--config.peft.ia3.targets=\"\('key\$', 'value\$'\)\" and "
       r"--config.peft.ia3.feedforward=\"\('layer_\\\\d\+/output/dense\$',\)\""),
      (bert, _ia3_config(targets=('key', 'value', r'layer_\d+/output/dense$')),
       r"inputs of \[\] \(peft.ia3.feedforward\), unlike the adapter at "
       r"\['layer_0/output/dense', 'layer_1/output/dense'\]"),
      (gpt2, _ia3_config(), r"made for a base model whose scaled modules are .*bert\.encoder"
       r".*this run's model \(gpt2\) has no module .*--config.pretrained"),
      (bert, _peft_config('lora'), r'IA3 adapter; set --config.peft.method=ia3'),
  ]
  for model, cfg, message in cases:
    with pytest.raises(ValueError, match=message):
      hf_format.load_adapter(peft.adapt(model, cfg), model, str(tmp_path))
  # A vector of another size: a BERT of other widths.
  other = tmp_path / 'other'
  other.mkdir()
  (other / hf_format.PEFT_CONFIG).write_text((tmp_path / hf_format.PEFT_CONFIG).read_text())
  tensors = safetensors.numpy.load_file(str(tmp_path / hf_format.PEFT_WEIGHTS))
  tensors['base_model.model.bert.encoder.layer.0.output.dense.ia3_l'] = np.ones((1, 40),
                                                                                np.float32)
  safetensors.numpy.save_file(tensors, str(other / hf_format.PEFT_WEIGHTS))
  with pytest.raises(ValueError, match=r'base model whose bert.encoder.layer.0.output.dense has '
                     r"an ia3_l of shape \(1, 40\) \(scaling its input\); this run's model has "
                     r"'layer_0/output/dense' with a \(37, 32\) kernel"):
    hf_format.load_adapter(peft.adapt(bert, _ia3_config()), bert, str(other))
  # The fix the message names loads it.
  fixed = _ia3_config(targets=('key$', 'value$'), feedforward=(r'layer_\d+/output/dense$',))
  hf_format.load_adapter(peft.adapt(bert, fixed), bert, str(tmp_path))
  # An IA3 run refuses a LoRA adapter the same way.
  lora_dir = tmp_path / 'lora'
  adapted = peft.adapt(bert, _peft_config('lora', rank=4, alpha=8.0))
  hf_format.save_peft(bert, adapted, adapted.params, str(lora_dir), method='lora')
  with pytest.raises(ValueError, match=r'LoRA adapter; set --config.peft.method=lora'):
    hf_format.load_adapter(peft.adapt(bert, _ia3_config()), bert, str(lora_dir))


# ------------------------------------------------------------------ prompt and prefix tuning

P = 3  # virtual tokens


def _virtual_config(method, n=P, **options):
  c = base_config.get_config().peft
  c.method = method
  c[method].update({'num_virtual_tokens': n, **options})
  return c


def _randomise_virtual(params, seed=1):
  """Prompts and prefixes moved off their init and a new head, so every mapping shows."""
  return randomise(params, [(re.compile('^(prompt_embeddings|prefix/)').search,
                             lambda rng, v: v + normal(rng, v, scale=0.5)),
                            (re.compile('^head/').search, normal)], seed)


def _theirs_virtual(torch_model, family, method, inputs):
  """HF's logits for the input tokens: a decoder's prompt positions get logits there too."""
  logits = _theirs(torch_model, family, inputs)
  return logits[:, P:] if method == 'prompt_tuning' and family != 'bert' else logits


# family, method, our options: the Llama prefix (GQA) trained through an MLP.
VIRTUAL_EXPORT_CASES = [
    ('bert', 'prompt_tuning', {}), ('gpt2', 'prompt_tuning', {}),
    ('llama', 'prompt_tuning', {}), ('gpt2', 'prefix_tuning', {}),
    ('llama', 'prefix_tuning', dict(projection_size=16)),
]


@pytest.mark.parametrize('family, method, options', VIRTUAL_EXPORT_CASES,
                         ids=[f'{f}-{m}{"-mlp" if o else ""}'
                              for f, m, o in VIRTUAL_EXPORT_CASES])
def test_virtual_tokens_export_loads_in_peft(zoo, tmp_path, family, method, options):
  exported = _export_to_peft(zoo, tmp_path, family, method,
                             _virtual_config(method, **options), _randomise_virtual)
  config = json.loads((exported.out / hf_format.PEFT_CONFIG).read_text())
  assert config['peft_type'] == method.upper() and config['num_virtual_tokens'] == P
  assert config['modules_to_save'] == (['classifier'] if family == 'bert' else None)
  assert config.get('prefix_projection') in (None, False)  # the MLP's output, not the MLP
  # And it imports back: a prefix as keys and values (projection_size=0).
  model = exported.model
  back = hf_format.load_adapter(peft.adapt(model, _virtual_config(method)), model,
                                str(exported.out))
  assert np.abs(_ours(back.module, back.params, exported.inputs) - exported.ours).max() <= TOL


def _peft_virtual(hf, family, method, path, projection=False):
  """A prompt or prefix adapter made and saved by HF PEFT, its values and head randomised."""
  from peft import PrefixTuningConfig, PromptTuningConfig
  task = 'SEQ_CLS' if family == 'bert' else 'CAUSAL_LM'
  if method == 'prompt_tuning':
    config = PromptTuningConfig(task_type=task, num_virtual_tokens=P)
  else:
    config = PrefixTuningConfig(task_type=task, num_virtual_tokens=P,
                                prefix_projection=projection, encoder_hidden_size=16)

  def move(name, p):
    if 'prompt_encoder' in name and 'embedding' in name:
      p.normal_(0.0, 0.5)
    elif 'modules_to_save' in name:
      _scale_randomly(p)
  return _peft_made(hf, config, path, 6, move)


# family, method, prefix_projection: PEFT saves an MLP's output as the prefix.
VIRTUAL_IMPORT_CASES = [('bert', 'prompt_tuning', False), ('llama', 'prompt_tuning', False),
                        ('gpt2', 'prefix_tuning', False), ('llama', 'prefix_tuning', True)]


@pytest.mark.parametrize('family, method, projection', VIRTUAL_IMPORT_CASES,
                         ids=[f'{f}-{m}{"-mlp" if p else ""}'
                              for f, m, p in VIRTUAL_IMPORT_CASES])
def test_peft_made_virtual_tokens_import(zoo, tmp_path, family, method, projection):
  hf, _, model = zoo[family]
  theirs = _peft_virtual(hf, family, method, tmp_path, projection)
  inputs = _inputs(family)
  expected = _theirs_virtual(theirs, family, method, inputs)
  adapted = peft.adapt(model, _virtual_config(method))
  assert np.abs(expected - _ours(adapted.module, adapted.params, inputs)).max() > 1e-2
  loaded = hf_format.load_adapter(adapted, model, str(tmp_path))
  assert np.abs(_ours(loaded.module, loaded.params, inputs) - expected).max() <= TOL
  before, after = paths.flatten(adapted.params), paths.flatten(loaded.params)
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed == adapted.trainable


def test_our_adapter_format_round_trips_virtual_tokens(zoo, tmp_path):
  _, _, model = zoo['bert']
  for method, options in (('prompt_tuning', {}), ('prefix_tuning', dict(projection_size=8))):
    cfg = _virtual_config(method, **options)
    adapted = peft.adapt(model, cfg)
    params = _randomise_virtual(adapted.params)
    out = tmp_path / method
    hf_format.save_adapter(model, adapted, params, str(out), method=method, base_model='x')
    assert set(safetensors.numpy.load_file(str(out / hf_format.OUR_WEIGHTS))) == adapted.trainable
    loaded = hf_format.load_adapter(peft.adapt(model, cfg), model, str(out))
    for p, v in paths.flatten(params).items():
      np.testing.assert_array_equal(paths.flatten(loaded.params)[p], v, err_msg=p)
    with pytest.raises(ValueError, match=r'\(path, adapter shape, our shape\) differ'):
      hf_format.load_adapter(peft.adapt(model, _virtual_config(method, n=4, **options)),
                             model, str(out))


def test_mismatched_virtual_tokens_are_refused_by_name(zoo, tmp_path, bert_adapter):
  bert, gpt2, llama = zoo['bert'][2], zoo['gpt2'][2], zoo['llama'][2]
  prompt, prefix = tmp_path / 'prompt', tmp_path / 'prefix'
  _peft_virtual(zoo['bert'][0], 'bert', 'prompt_tuning', prompt)
  _peft_virtual(zoo['gpt2'][0], 'gpt2', 'prefix_tuning', prefix)
  cases = [
      (bert, _virtual_config('prompt_tuning', n=4), prompt,
       r'has num_virtual_tokens=3; this run uses 4 \(peft.prompt_tuning.num_virtual_tokens\)\. '
       r'Set --config.peft.prompt_tuning.num_virtual_tokens=3'),
      (gpt2, _virtual_config('prefix_tuning', n=2), prefix,
       r'--config.peft.prefix_tuning.num_virtual_tokens=3'),
      (bert, _peft_config('lora'), prompt,
       r'prompt-tuning adapter; set --config.peft.method=prompt_tuning'),
      (gpt2, _virtual_config('prompt_tuning'), prefix,
       r'prefix-tuning adapter; set --config.peft.method=prefix_tuning'),
      (gpt2, _virtual_config('prefix_tuning', projection_size=8), prefix,
       r'stores the prefix itself.*--config.peft.prefix_tuning.projection_size=0'),
      (llama, _virtual_config('prefix_tuning'), prefix,
       r"base model whose token_dim=32, num_layers=2, num_attention_heads=4 \(prompt_embeddings "
       r"\(3, 128\)\); this run's model \(llama\) has token_dim=16, num_layers=2, "
       r'num_attention_heads=2 .*--config.pretrained'),
      (bert, _virtual_config('prompt_tuning'), bert_adapter,
       r'LoRA adapter; set --config.peft.method=lora'),
      (gpt2, _virtual_config('prefix_tuning', projection_size=8), bert_adapter,
       r"base model whose adapted modules are .*bert\.encoder.*\(gpt2\) has no module"),
  ]
  for model, cfg, path, message in cases:
    with pytest.raises(ValueError, match=message):
      hf_format.load_adapter(peft.adapt(model, cfg), model, str(path))
  headless = models.load_pretrained(zoo['bert'][1], num_classes=0, pooling='pooler')
  with pytest.raises(ValueError, match=r'trained classifier \(3 classes\).*num_classes=3'):
    hf_format.load_adapter(peft.adapt(headless, _virtual_config('prompt_tuning')), headless,
                           str(prompt))
  # Exports that cannot be: BERT prefixes for HF PEFT, any merged prompt or prefix.
  adapted = peft.adapt(bert, _virtual_config('prefix_tuning'))
  with pytest.raises(ValueError, match=r"prefix_tuning' on BERT has no HF PEFT export: "
                     r"transformers 5's BERT takes no past_key_values.*--format adapter"):
    hf_format.save_peft(bert, adapted, adapted.params, str(tmp_path / 'out'),
                        method='prefix_tuning')
  assert not (tmp_path / 'out').exists()
  with pytest.raises(ValueError, match=r"'prefix_tuning' learns positions ahead of the input"):
    hf_format.save_merged(bert, adapted, adapted.params, str(tmp_path / 'out'),
                          method='prefix_tuning')


def test_run_from_a_peft_prompt_exports(zoo, tmp_path, monkeypatch):
  """export.export of a prompt-tuning run started from a PEFT prompt: its trained
  prompt in PEFT's file, and no merged model."""
  hf, hf_path, _ = zoo['llama']
  _peft_virtual(hf, 'llama', 'prompt_tuning', tmp_path / 'start')
  workdir, start, out = _export_run_from_start(tmp_path, monkeypatch, hf_path,
                                               _virtual_config('prompt_tuning'))
  assert sorted(out) == [virtual_tokens.PROMPT_KEY]
  np.testing.assert_allclose(out[virtual_tokens.PROMPT_KEY], start[virtual_tokens.PROMPT_KEY] * 1.1,
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"'prompt_tuning' learns positions ahead of the input"):
    export.export(str(workdir), 'merged', str(tmp_path / 'merged'))


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope='module')
def bert_adapter(zoo, tmp_path_factory):
  """A PEFT LoRA adapter (r=4, alpha 8, query+value, classifier) for the HF BERT."""
  _, _, model = zoo['bert']
  adapted = peft.adapt(model, _peft_config('lora', rank=4, alpha=8.0))
  path = tmp_path_factory.mktemp('adapter') / 'bert'
  hf_format.save_peft(model, adapted, _randomise(adapted.params), str(path), method='lora')
  return str(path)


def test_mismatched_adapters_are_refused_by_name(zoo, bert_adapter):
  bert, gpt2 = zoo['bert'][2], zoo['gpt2'][2]
  cases = [
      (gpt2, _peft_config('lora', rank=4, alpha=8.0),
       r'made for a base model whose adapted modules are .*bert\.encoder\.layer\.\*\.attention'
       r".*this run's model \(gpt2\) has no module .*--config.pretrained"),
      (bert, _peft_config('lora', rank=8, alpha=8.0),
       r'has LoRA ranks .*4.*this run uses ranks .*8.*--config.peft.lora.rank=4'),
      (bert, _peft_config('lora', rank=4, alpha=16.0),
       r'lora_alpha=8 but this run peft.lora.alpha=16.*--config.peft.lora.alpha=8'),
      (bert, _peft_config('lora', rank=4, alpha=8.0, targets=('query',)),
       r"adapts \['layer_\*/attention/self/query'\].*targets=\"\('query\$', 'value\$'\)"),
      (bert, _peft_config('dora', rank=4, alpha=8.0),
       r'LoRA adapter; set --config.peft.method=lora'),
      (bert, _peft_config('full'), r'LoRA adapter; set --config.peft.method=lora'),
  ]
  for model, cfg, message in cases:
    with pytest.raises(ValueError, match=message):
      hf_format.load_adapter(peft.adapt(model, cfg), model, bert_adapter)
  headless = models.load_pretrained(zoo['bert'][1], num_classes=0, pooling='pooler')
  with pytest.raises(ValueError, match=r'trained classifier \(3 classes\).*num_classes=3'):
    hf_format.load_adapter(peft.adapt(headless, _peft_config(rank=4, alpha=8.0)), headless,
                           bert_adapter)
  with pytest.raises(ValueError, match='not an adapter dir'):
    hf_format.load_adapter(peft.adapt(bert, _peft_config()), bert, zoo['bert'][1])


def test_formats_refuse_what_they_cannot_hold(zoo, tmp_path):
  _, _, model = zoo['bert']
  full = peft.adapt(model, _peft_config('full'))
  with pytest.raises(ValueError, match="'full' trains no adapter.*--format merged"):
    hf_format.save_peft(model, full, full.params, str(tmp_path), method='full')
  with pytest.raises(ValueError, match="--format peft is not supported yet for "
                     "peft.method='adapter'"):
    hf_format.save_peft(model, full, full.params, str(tmp_path), method='adapter')
  with pytest.raises(ValueError, match="peft.method='prompt_tuning' learns positions ahead "
                     "of the input.*no merged model.*--format peft"):
    hf_format.merged_params(full, full.params, method='prompt_tuning')
  resnet = models.load_pretrained('resnet-tiny', num_classes=3)
  with pytest.raises(ValueError, match="family 'resnet' has no Hugging Face layout"):
    hf_format.save_merged(resnet, peft.adapt(resnet, _peft_config('full')), resnet.params,
                          str(tmp_path), method='full')


# ------------------------------------------------------------------ end to end


def test_cli_exports_a_trained_run(zoo, tmp_path):
  """A PEFT adapter -> peft.init_from -> train_and_evaluate -> python -m
  finetune_jax.export -> PEFT and transformers give our outputs."""
  import torch
  from peft import LoraConfig, PeftModel, get_peft_model
  from transformers import BertForSequenceClassification
  _, hf_path, _ = zoo['bert']

  def base():  # the HF BERT with a new 8-class classifier
    labels = {i: f'LABEL_{i}' for i in range(8)}
    return BertForSequenceClassification.from_pretrained(
        hf_path, id2label=labels, label2id={v: k for k, v in labels.items()},
        ignore_mismatched_sizes=True).eval()

  torch.manual_seed(4)
  start = get_peft_model(base(), LoraConfig(
      r=2, lora_alpha=16, target_modules=['query', 'value'], use_dora=True,
      init_lora_weights=False, modules_to_save=['classifier']))
  start.save_pretrained(str(tmp_path / 'start'))
  config = minilm_fortunes.get_config('smoke')
  config.unlock()
  config.pretrained = hf_path
  config.num_classes = 8
  config.text.pooling = 'pooler'
  config.text.max_length = 32
  config.batch_size, config.eval_batch_size = 8, 512
  config.total_steps = config.checkpoint_every = 2
  config.peft.method = 'dora'
  config.peft.lora.rank = 2
  config.peft.init_from = str(tmp_path / 'start')
  config.lock()
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)

  out = tmp_path / 'peft'
  subprocess.run([sys.executable, '-m', 'finetune_jax.export', '--workdir', workdir,
                  '--format', 'peft', '--out', str(out)], check=True, cwd=ROOT,
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True)
  adapter_config = json.loads((out / hf_format.PEFT_CONFIG).read_text())
  assert adapter_config['use_dora'] and adapter_config['modules_to_save'] == ['classifier']
  assert adapter_config['base_model_name_or_path'] == hf_path
  # Training started from the adapter: two small steps away from it, not from B = 0.
  started = safetensors.numpy.load_file(str(tmp_path / 'start' / hf_format.PEFT_WEIGHTS))
  trained = safetensors.numpy.load_file(str(out / hf_format.PEFT_WEIGHTS))
  assert sorted(started) == sorted(trained)
  moved = max(np.abs(trained[k] - started[k]).max() for k in started)
  b = next(k for k in started if 'lora_B' in k)
  assert 0 < moved < 0.02 and np.abs(started[b]).max() > 0.1, moved

  read = export.read_config(workdir)
  model, adapted, params, step = export.restore(workdir, read)
  assert step == 2
  inputs = _inputs('bert')
  ours = _ours(adapted.module, params, inputs)
  loaded = PeftModel.from_pretrained(base(), str(out)).eval()
  assert np.abs(_theirs(loaded, 'bert', inputs) - ours).max() <= TOL

  export.export(workdir, 'merged', str(tmp_path / 'merged'))
  merged = BertForSequenceClassification.from_pretrained(str(tmp_path / 'merged')).eval()
  assert np.abs(_theirs(merged, 'bert', inputs) - ours).max() <= TOL

  # The adapter alone; init_from takes either format.
  export.export(workdir, 'adapter', str(tmp_path / 'adapter'))
  for source in (tmp_path / 'adapter', out):
    again = hf_format.load_adapter(train.build_model(read)[1], model, str(source))
    assert np.abs(_ours(again.module, again.params, inputs) - ours).max() <= TOL
