"""IA3 and bottleneck adapters: identity at init, training invariants, counts, HF PEFT parity."""
import copy
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax import base_config
from finetune_jax import models
from finetune_jax import peft
from finetune_jax import tasks
from finetune_jax.peft import adapter
from finetune_jax.peft import ia3
from finetune_jax.peft import paths
from hf_files import around_one, normal, randomise
# The zoo fixtures and the batch and training helpers LoRA's tests drive make_train_step with.
from test_lora import (_train, assert_only_trainable_moved, hf_bert,  # noqa: F401
                       image_batch, inputs_for, output, text_batch, zoo)

FAMILIES = ('bert-tiny', 'gpt2-tiny', 'llama-tiny', 'vit-tiny')


def peft_config(method, **options):
  c = base_config.get_config().peft
  c.method = method
  c[method].update(options)
  return c


def is_new(path):
  return any(part in ia3.LEAVES + adapter.LEAVES for part in path.split('/'))


def perturb(params, seed=1):
  """Non-identity IA3 vectors and adapters, so the hooks show in the outputs."""
  return randomise(params, [(re.compile(f'/{ia3.SCALE}$').search, around_one),
                            (is_new, normal)], seed)


def batch_for(model):
  return image_batch() if model.preprocess else text_batch(model, labels=False)


# ------------------------------------------------------------------ identity at init


@pytest.mark.parametrize('alias', FAMILIES)
def test_identity_at_init_and_the_hooks_fire(zoo, alias):
  model = zoo[alias]
  args = inputs_for(model)(batch_for(model))
  reference = output(jax.jit(model.module.apply)({'params': model.params}, *args))
  for method, options in (('ia3', {}), ('adapter', {'size': 8})):  # Pfeiffer: a subset
    adapted = peft.adapt(model, peft_config(method, **options))
    fn = jax.jit(adapted.module.apply)
    # Equal up to float32 rounding: XLA may fuse a multiply by 1 into a matmul differently.
    np.testing.assert_allclose(output(fn({'params': adapted.params}, *args)), reference,
                               rtol=1e-6, atol=1e-6, err_msg=f'{method} {options}')
    moved = output(fn({'params': perturb(adapted.params)}, *args))
    assert np.abs(moved - reference).max() > 1e-2, (method, options, 'the hooks fire')


def test_ia3_merge_folds_the_vectors(zoo):
  """Output scales (GPT-2's fused k|v, with biases) and input scales fold into the kernels."""
  model = zoo['gpt2-tiny']
  adapted = peft.adapt(model, peft_config('ia3'))
  trained = perturb(adapted.params)
  args = inputs_for(model)(batch_for(model))
  unmerged = output(jax.jit(adapted.module.apply)({'params': trained}, *args))
  merged = ia3.merge(adapted.module, trained)
  assert paths.flatten(merged).keys() == paths.flatten(model.params).keys()
  folded = output(jax.jit(model.module.apply)({'params': merged}, *args))
  np.testing.assert_allclose(folded, unmerged, rtol=0, atol=1e-5)
  # The q third of c_attn is untouched, k and v are scaled.
  flat, kernel = paths.flatten(merged), paths.flatten(model.params)['h_0/attn/c_attn/kernel']
  scale = paths.flatten(trained)['h_0/attn/c_attn/' + ia3.SCALE]
  np.testing.assert_array_equal(flat['h_0/attn/c_attn/kernel'][:, :32], kernel[:, :32])
  np.testing.assert_allclose(flat['h_0/attn/c_attn/kernel'][:, 32:], kernel[:, 32:] * scale,
                             rtol=1e-6)


# ------------------------------------------------------------------ training


TRAIN_CASES = {
    # (method, options, alias): (task, batch, learning rate)
    ('ia3', (), 'bert-tiny'): (lambda: tasks.TextClassification(2), text_batch, 3e-2),
    # Vectors that start at 1 need IA3's large rates: a random decoder's tiny activations.
    ('ia3', (), 'gpt2-tiny'): (tasks.CausalLM, lambda m: text_batch(m, labels=False), 0.3),
    ('adapter', (('size', 8),), 'llama-tiny'): (
        tasks.CausalLM, lambda m: text_batch(m, labels=False), 3e-2),
    ('adapter', (('size', 8), ('kind', 'pfeiffer')), 'vit-tiny'): (
        lambda: tasks.ImageClassification(3), lambda m: image_batch(), 3e-2),
}


@pytest.mark.parametrize('case', list(TRAIN_CASES), ids=lambda c: f'{c[0]}-{c[2]}')
def test_training_moves_only_the_new_params_and_head(zoo, case):
  method, options, alias = case
  task, make_batch, lr = TRAIN_CASES[case]
  model = zoo[alias]
  adapted = peft.adapt(model, peft_config(method, **dict(options)))
  state, frozen, losses = _train(model, adapted, task(), make_batch(model), 6, lr=lr)
  assert losses[-1] < losses[0] - 0.05, losses  # the same small real batch each step
  before = paths.flatten(adapted.params)
  after = paths.flatten(paths.join(state['trainable'], frozen))
  head = ({p for p in before if p.startswith(model.head + '/')}
          if model.config.get('num_classes') else set())
  assert adapted.trainable == {p for p in before if is_new(p)} | head
  assert_only_trainable_moved(adapted, state, before, after)


# ------------------------------------------------------------------ counts


def dims(model):
  """(layers, width, MLP width, key/value width) from the model's config."""
  c = model.config
  mlp = c.get('intermediate_size') or c.get('mlp_dim')
  kv = c.get('num_kv_heads', c['num_heads']) * c.get('head_dim', c['hidden_size'] // c['num_heads'])
  return c['num_layers'], c['hidden_size'], mlp, kv


@pytest.mark.parametrize('alias', FAMILIES)
def test_trainable_counts(zoo, alias):
  model = zoo[alias]
  layers, d, mlp, kv = dims(model)
  head = paths.count(model.params[model.head]) if model.config.get('num_classes') else 0

  def counts(method, **options):
    adapted = peft.adapt(model, peft_config(method, **options))
    added = paths.count(adapted.params) - paths.count(model.params)
    return added, paths.count(paths.split(adapted.params, adapted.trainable)[0]) - head

  # IA3: a k and a v vector (their out width) and the MLP down projection's input.
  assert counts('ia3') == (layers * (2 * kv + mlp),) * 2
  # Adapters: down (d, r) + r, up (r, d) + d; Houlsby two per layer, Pfeiffer one.
  r = 4
  one = 2 * d * r + r + d
  assert counts('adapter', size=r) == (2 * layers * one,) * 2
  assert counts('adapter', size=r, kind='pfeiffer') == (layers * one,) * 2


def test_leaf_names_shapes_and_defaults(zoo):
  def new_leaves(alias, method, **options):
    flat = paths.flatten(peft.adapt(zoo[alias], peft_config(method, **options)).params)
    return {p: tuple(v.shape) for p, v in flat.items() if is_new(p) and '_0/' in p}

  assert new_leaves('bert-tiny', 'ia3') == {
      'layer_0/attention/self/key/ia3_scale': (32,),
      'layer_0/attention/self/value/ia3_scale': (32,),
      'layer_0/output/dense/ia3_scale': (64,)}  # the intermediate, on output/dense's input
  assert new_leaves('gpt2-tiny', 'ia3') == {
      'h_0/attn/c_attn/ia3_scale': (64,),  # k and v of the fused (32 -> 96) q|k|v
      'h_0/mlp/c_proj/ia3_scale': (128,)}
  assert new_leaves('llama-tiny', 'ia3') == {
      'layers_0/self_attn/k_proj/ia3_scale': (16,),
      'layers_0/self_attn/v_proj/ia3_scale': (16,),
      'layers_0/mlp/down_proj/ia3_scale': (64,)}
  assert set(new_leaves('vit-tiny', 'ia3')) == {
      'encoderblock_0/attention/key/ia3_scale', 'encoderblock_0/attention/value/ia3_scale',
      'encoderblock_0/mlp/fc2/ia3_scale'}
  houlsby = {
      'bert-tiny': ('layer_0/attention/output/dense', 'layer_0/output/dense'),
      'gpt2-tiny': ('h_0/attn/c_proj', 'h_0/mlp/c_proj'),
      'llama-tiny': ('layers_0/self_attn/o_proj', 'layers_0/mlp/down_proj'),
      'vit-tiny': ('encoderblock_0/attention/out', 'encoderblock_0/mlp/fc2')}
  for alias, (attention, mlp) in houlsby.items():
    assert adapter.adapted_modules(new_leaves(alias, 'adapter', size=4)) == sorted(
        [attention, mlp]), alias
    assert adapter.adapted_modules(new_leaves(alias, 'adapter', size=4, kind='pfeiffer')) == [mlp]
  leaves = new_leaves('bert-tiny', 'adapter', size=4, kind='pfeiffer')
  assert leaves == {'layer_0/output/dense/adapter_down/kernel': (32, 4),
                    'layer_0/output/dense/adapter_down/bias': (4,),
                    'layer_0/output/dense/adapter_up/kernel': (4, 32),
                    'layer_0/output/dense/adapter_up/bias': (32,)}
  flat = paths.flatten(peft.adapt(zoo['bert-tiny'], peft_config('adapter', size=4)).params)
  down = np.asarray(flat['layer_0/output/dense/adapter_down/kernel'])
  assert 0.005 < down.std() < 0.02  # N(0, 0.01^2)
  np.testing.assert_array_equal(flat['layer_0/output/dense/adapter_up/kernel'], 0)
  # Explicit targets replace the defaults; the head trains in full and is no target.
  adapted = peft.adapt(zoo['vit-tiny'], peft_config('ia3', targets=('.',)))
  assert {'head/kernel', 'head/bias'} <= adapted.trainable
  assert not any(p.startswith('head/ia3') for p in paths.flatten(adapted.params))
  only_kv = peft.adapt(zoo['llama-tiny'], peft_config('ia3', targets=('v_proj$',)))
  assert sorted(p for p in paths.flatten(only_kv.params) if is_new(p)) == [
      'layers_0/self_attn/v_proj/ia3_scale', 'layers_1/self_attn/v_proj/ia3_scale']


# ------------------------------------------------------------------ HF PEFT parity


def _parity(hf, ours, config, ours_config, rename, ids, mask, kv_fused=None):
  """Randomised HF PEFT IA3 vectors mapped into ours; last hidden states within 1e-4."""
  import torch
  from peft import get_peft_model
  torch.manual_seed(1)
  hf_peft = get_peft_model(copy.deepcopy(hf), config).eval()
  with torch.no_grad():
    for name, p in hf_peft.named_parameters():
      if 'ia3_l' in name:
        p.copy_(torch.rand_like(p) + 0.5)
        if kv_fused and kv_fused in name:  # our fused vector scales k and v only
          p.view(-1)[:p.numel() // 3] = 1.0
  with torch.no_grad():
    run = lambda m: m(input_ids=torch.from_numpy(ids),
                      attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    expected, base = run(hf_peft), run(hf)
  adapted = peft.adapt(ours, ours_config)
  flat = paths.flatten(adapted.params)
  mapped = set()
  for name, value in hf_peft.state_dict().items():
    if name.endswith('.ia3_l.default'):
      key = rename(name[:-len('.ia3_l.default')]) + '/' + ia3.SCALE
      value = value.numpy().reshape(-1)
      if kv_fused and kv_fused in name:
        value = value[value.size // 3:]
      assert flat[key].shape == value.shape, key
      flat[key] = jnp.asarray(value)
      mapped.add(key)
  assert mapped == {p for p in flat if is_new(p)}
  got = output(jax.jit(adapted.module.apply)({'params': paths.unflatten(flat)}, ids, mask))
  real = mask.astype(bool)
  assert np.abs(got - expected)[real].max() <= 1e-4
  assert np.abs(base - expected)[real].max() > 1e-2, 'the vectors change the outputs'


def _bert_name(name):
  """'base_model.model.encoder.layer.0.attention.self.key' -> 'layer_0/attention/self/key'."""
  return re.sub(r'layer\.(\d+)\.', r'layer_\1/', name.split('encoder.', 1)[1]).replace('.', '/')


@pytest.mark.parametrize('targets', ['explicit', 'defaults'])
def test_ia3_matches_hf_peft_on_bert(hf_bert, targets):
  from peft import IA3Config
  hf, ours = hf_bert
  if targets == 'explicit':  # HF's BERT default: 'output.dense' also catches attention.output
    config = IA3Config(target_modules=['key', 'value', 'output.dense'],
                       feedforward_modules=['output.dense'])
    ours_config = peft_config('ia3', targets=('key$', 'value$'), feedforward=('output/dense$',))
  else:  # our defaults: the MLP's output.dense only
    config = IA3Config(target_modules=r'.*layer\.\d+\.(attention\.self\.(key|value)|output\.dense)',
                       feedforward_modules=r'.*layer\.\d+\.output\.dense')
    ours_config = peft_config('ia3')
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 99, (2, 9))
  mask = np.array([[1] * 9, [1] * 6 + [0] * 3])
  _parity(hf, ours, config, ours_config, _bert_name, ids, mask)


def test_ia3_matches_hf_peft_on_gpt2_fused_qkv(tmp_path):
  """HF's c_attn vector has 3D entries; with its q third at 1 it is ours."""
  import torch
  from peft import IA3Config
  from transformers import GPT2Config, GPT2Model
  torch.manual_seed(0)
  hf = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                            bos_token_id=49, eos_token_id=49))
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(torch.rand_like(p) + 0.5 if 'ln_' in name and name.endswith('weight')
              else 0.3 * torch.randn_like(p))
  hf.eval().save_pretrained(tmp_path)
  ours = models.load_pretrained(str(tmp_path))
  config = IA3Config(target_modules=['c_attn', 'mlp.c_proj'], feedforward_modules=['mlp.c_proj'])
  rename = lambda n: re.sub(r'h\.(\d+)\.', r'h_\1/', n.split('.model.', 1)[1]).replace('.', '/')
  ids = np.random.default_rng(0).integers(0, 49, (2, 7))
  _parity(hf, ours, config, peft_config('ia3'), rename, ids, np.ones_like(ids), 'c_attn')


# ------------------------------------------------------------------ bad input


def test_patterns_matching_nothing_list_the_candidates(zoo):
  bert = zoo['bert-tiny']
  for method, option, options in (
      ('ia3', 'peft.ia3.targets', {'targets': ('key', 'attention.self.vaule')}),
      ('ia3', 'peft.ia3.feedforward', {'targets': ('key',), 'feedforward': ('outptu',)}),
      ('adapter', 'peft.adapter.targets', {'targets': ('attention.self.vaule',)})):
    with pytest.raises(ValueError) as e:
      peft.adapt(bert, peft_config(method, **options))
    message = str(e.value)
    assert message.startswith(option) and 'match no nn.Dense/nn.Conv module' in message
    assert 'layer_*/attention/self/query' in message and 'pooler/dense' in message  # all
    assert "head 'head/' trains in full" in message and f'--config.{option}=' in message
  assert 'layer_0/attention/self/value' in str(
      pytest.raises(ValueError, peft.adapt, bert, peft_config(
          'adapter', targets=('attention.self.vaule',))).value)  # nearest


def test_methods_that_do_not_apply_are_named(zoo):
  resnet = zoo['resnet-tiny']
  for method in ('ia3', 'adapter'):
    with pytest.raises(ValueError, match=rf'peft.method={method} does not apply to this model '
                       r'\(resnet-tiny\): it needs .*bert/gpt2/llama/vit.*Choose another') as e:
      peft.adapt(resnet, peft_config(method))
    assert f'peft.{method}.' in str(e.value)


def test_bad_options(zoo):
  bert = zoo['bert-tiny']
  with pytest.raises(ValueError, match=r"kind='bottleneck' must be one of.*size=0 must be a "
                     'positive integer'):
    peft.adapt(bert, peft_config('adapter', kind='bottleneck', size=0))
  with pytest.raises(ValueError, match=r"selected by both peft.ia3.targets .* and "
                     r'peft.ia3.feedforward'):
    peft.adapt(bert, peft_config('ia3', targets=('output/dense$',),
                                 feedforward=('layer_\\d+/output/dense$',)))
  adapted = peft.adapt(bert, peft_config('ia3'))
  with pytest.raises(ValueError, match='already hold IA3 vectors'):
    peft.adapt(dataclasses.replace(bert, params=adapted.params), peft_config('ia3'))
