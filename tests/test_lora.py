"""LoRA and DoRA: interception, training invariants, merge, HF PEFT parity."""
import copy
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from finetune_jax import base_config
from finetune_jax import models
from finetune_jax import optim
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax.models import architecture
from finetune_jax.peft import intercept
from finetune_jax.peft import lora
from finetune_jax.peft import paths

SENTENCES = ['what a wonderful, lovely day', 'this is awful and sad',
             'a great and happy film', 'terrible, boring and bad',
             'i loved every minute', 'i hated all of it']


def peft_config(method='lora', **lora_kw):
  c = base_config.get_config().peft
  c.method = method
  c.lora.update(lora_kw)
  return c


@pytest.fixture(scope='module')
def zoo():
  """The tiny zoo, loaded once: {alias: Pretrained}."""
  classes = {'bert-tiny': 2, 'vit-tiny': 3, 'resnet-tiny': 3}
  options = {'bert-tiny': {'pooling': 'mean'}}  # a random BERT's [CLS] barely varies
  return {a: models.load_pretrained(a, num_classes=classes.get(a), **options.get(a, {}))
          for a in ('bert-tiny', 'gpt2-tiny', 'llama-tiny', 'vit-tiny', 'resnet-tiny')}


def text_batch(model, labels=True):
  enc = [model.tokenizer.encode(s).ids for s in SENTENCES]
  length = max(map(len, enc))
  ids = np.zeros((len(enc), length), np.int32)
  mask = np.zeros_like(ids)
  for i, e in enumerate(enc):
    ids[i, :len(e)], mask[i, :len(e)] = e, 1
  batch = {'input_ids': ids, 'attention_mask': mask, 'loss_mask': mask}
  if labels:
    batch['label'] = np.arange(len(enc), dtype=np.int32) % 2
  return batch


def image_batch(n=6):
  """Images whose class is their dominant colour channel."""
  rng = np.random.default_rng(0)
  labels = np.arange(n) % 3
  images = rng.integers(0, 60, (n, 32, 32, 3))
  images[np.arange(n), :, :, labels] += 190
  return {'image': images.astype(np.uint8), 'label': labels.astype(np.int32)}


def inputs_for(model):
  if model.preprocess is not None:
    return lambda b: (model.preprocess(b['image']),)
  return lambda b: (b['input_ids'], b['attention_mask'])


def randomise(params, scale=0.2, seed=1):
  """Non-zero B (and perturbed DoRA magnitudes), so the updates show."""
  rng = np.random.default_rng(seed)
  flat = paths.flatten(params)
  for p, v in flat.items():
    if p.endswith('/' + lora.B):
      flat[p] = jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype)
    elif p.endswith('/' + lora.MAGNITUDE):
      flat[p] = v * jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
  return paths.unflatten(flat)


def output(out):
  """Hidden states or features: a new classifier head is zero and hides changes."""
  for key in ('last_hidden_state', 'features', 'logits'):
    if key in out:
      return np.asarray(out[key])


# ------------------------------------------------------------------ one layer


@pytest.mark.parametrize('rslora', [False, True])
def test_dense_formula_and_scaling(rslora):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
  p = {'kernel': rng.standard_normal((5, 6)), 'bias': rng.standard_normal(6),
       lora.A: rng.standard_normal((5, 4)), lora.B: rng.standard_normal((4, 6))}
  p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p)
  module = intercept.Intercepted(nn.Dense(6), lora.Hook(8.0, rslora, 0.0, False))
  s = 8.0 / 2 if rslora else 8.0 / 4  # alpha / sqrt(r) or alpha / r
  expected = x @ p['kernel'] + p['bias'] + s * (x @ p[lora.A]) @ p[lora.B]
  np.testing.assert_allclose(module.apply({'params': p}, x), expected, rtol=1e-5, atol=1e-5)

  # DoRA: m / ||W + s A B|| (x W + s x A B) + b, norms over the input axis.
  p[lora.MAGNITUDE] = jnp.asarray(rng.uniform(1, 2, 6), jnp.float32)
  dora = intercept.Intercepted(nn.Dense(6), lora.Hook(8.0, rslora, 0.0, True))
  v = p['kernel'] + s * p[lora.A] @ p[lora.B]
  expected = x @ (v * p[lora.MAGNITUDE] / np.linalg.norm(v, axis=0)) + p['bias']
  np.testing.assert_allclose(dora.apply({'params': p}, x), expected, rtol=1e-5, atol=1e-5)


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3, name='dense')(x)


def test_dropout_only_in_train_and_on_the_lora_path():
  rng = np.random.default_rng(0)
  x = jnp.ones((4, 64), jnp.float32)
  p = {'kernel': jnp.zeros((64, 3)), 'bias': jnp.zeros(3),
       lora.A: jnp.asarray(rng.standard_normal((64, 2)), jnp.float32),
       lora.B: jnp.ones((2, 3))}
  p = {'dense': p}
  module = intercept.Intercepted(OneDense(), lora.Hook(2.0, False, 0.5, False))
  plain = module.apply({'params': p}, x)
  np.testing.assert_array_equal(module.apply({'params': p}, x, train=False), plain)
  dropped = module.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
  assert np.abs(np.asarray(dropped) - np.asarray(plain)).max() > 1e-3


def test_conv_lora_is_a_conv_then_a_1x1_and_merges():
  rng = np.random.default_rng(0)
  conv = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)))
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 4)), jnp.float32)
  p = {'kernel': rng.standard_normal((3, 3, 4, 6)), 'bias': rng.standard_normal(6),
       lora.A: rng.standard_normal((3, 3, 4, 2)), lora.B: rng.standard_normal((2, 6)),
       lora.MAGNITUDE: rng.uniform(1, 2, 6)}
  p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p)
  for dora in (False, True):
    module = intercept.Intercepted(conv, lora.Hook(4.0, False, 0.0, dora))
    merged = lora.merge(module, {'c': p})['c']
    assert set(merged) == {'kernel', 'bias'}
    np.testing.assert_allclose(module.apply({'params': p}, x),
                               conv.apply({'params': merged}, x), rtol=1e-5, atol=1e-5)
  # DoRA's conv norm runs over (kh, kw, in) per output channel.
  v = p['kernel'] + 2.0 * np.einsum('hwir,ro->hwio', p[lora.A], p[lora.B])
  np.testing.assert_allclose(
      lora.merge(module, {'c': p})['c']['kernel'],
      v * p[lora.MAGNITUDE] / np.sqrt((v ** 2).sum((0, 1, 2))), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the zoo


def _forward(zoo, alias, method, **lora_kw):
  model = zoo[alias]
  adapted = peft.adapt(model, peft_config(method, **lora_kw))
  batch = image_batch() if model.preprocess else text_batch(model, labels=False)
  args = inputs_for(model)(batch)
  return model, adapted, args


@pytest.mark.parametrize('alias,rank', [('llama-tiny', 8), ('bert-tiny', 8), ('resnet-tiny', 2)])
def test_zero_b_is_the_base_model_and_merge_matches(zoo, alias, rank):
  """Decoder, encoder and CNN: LoRA and DoRA, merged vs unmerged within 1e-5."""
  model, adapted, args = _forward(zoo, alias, 'lora', rank=rank)
  base_fn = jax.jit(model.module.apply)
  reference = output(base_fn({'params': model.params}, *args))
  assert np.abs(reference).max() > 0.1
  for method in ('lora', 'dora'):
    adapted = peft.adapt(model, peft_config(method, rank=rank))
    fn = jax.jit(adapted.module.apply)
    start = output(fn({'params': adapted.params}, *args))
    if method == 'lora':
      np.testing.assert_array_equal(start, reference)  # B = 0: exactly the base model
    else:
      np.testing.assert_allclose(start, reference, rtol=0, atol=1e-5)
    trained = randomise(adapted.params)
    unmerged = output(fn({'params': trained}, *args))
    assert np.abs(unmerged - reference).max() > 1e-2, 'the update shows'
    merged, norms = lora.merge(adapted.module, trained, return_norms=True)
    assert paths.flatten(merged).keys() == paths.flatten(model.params).keys()
    # float32 rounding: 1e-5 absolute on LayerNorm'd outputs, relative on a
    # random ResNet's unnormalised features (~60).
    error = np.abs(output(base_fn({'params': merged}, *args)) - unmerged).max()
    assert error <= 1e-5 * max(1.0, np.abs(unmerged).max()), (method, error)
    # unmerge recovers W (and the adapter leaves), from the merged kernels.
    back = paths.flatten(lora.unmerge(adapted.module, merged, lora.lora_params(trained),
                                      norms))
    for p, v in paths.flatten(trained).items():
      np.testing.assert_allclose(back[p], v, rtol=0, atol=2e-6, err_msg=p)


@pytest.mark.parametrize('alias', ['gpt2-tiny', 'vit-tiny'])
def test_zero_b_is_the_base_model(zoo, alias):
  model, adapted, args = _forward(zoo, alias, 'lora')
  np.testing.assert_array_equal(
      output(jax.jit(adapted.module.apply)({'params': adapted.params}, *args)),
      output(jax.jit(model.module.apply)({'params': model.params}, *args)))


def _train(model, adapted, task, batch, num_steps, lr=3e-2):
  """Adam over the trainable tree only, as train.py builds it; per-step losses."""
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optax.adam(lr)
  state = {'step': jnp.int32(0), 'rng': jax.random.PRNGKey(0),
           'trainable': trainable, 'opt_state': tx.init(trainable)}
  step = jax.jit(steps.make_train_step(adapted.module, inputs_for(model), task, tx, None))
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics['loss'] / metrics['count']))
  return state, frozen, losses


TRAIN_CASES = {
    # alias: (method, lora options, task, batch)
    'bert-tiny': ('lora', {}, lambda m: tasks.TextClassification(2), text_batch),
    'gpt2-tiny': ('dora', {'dropout': 0.1}, lambda m: tasks.CausalLM(),
                  lambda m: text_batch(m, labels=False)),
    'resnet-tiny': ('lora', {'rank': 2, 'targets': (r'conv2$', 'shortcut_conv')},
                    lambda m: tasks.ImageClassification(3), lambda m: image_batch()),
}


@pytest.mark.parametrize('alias', sorted(TRAIN_CASES))
def test_training_moves_only_lora_and_head_and_lowers_the_loss(zoo, alias):
  model = zoo[alias]
  method, options, task, make_batch = TRAIN_CASES[alias]
  adapted = peft.adapt(model, peft_config(method, **options))
  state, frozen, losses = _train(model, adapted, task(model), make_batch(model), 8)
  assert losses[-1] < losses[0] - 0.05, losses  # the same small real batch each step
  before, after = paths.flatten(adapted.params), paths.flatten(
      paths.join(state['trainable'], frozen))
  lora_leaves = {p for p in before if p.rsplit('/', 1)[-1] in lora.LEAVES}
  head = {p for p in before if p.startswith(model.head + '/')} if alias != 'gpt2-tiny' else set()
  assert adapted.trainable == lora_leaves | head
  assert_only_trainable_moved(adapted, state, before, after)


def assert_only_trainable_moved(adapted, state, before, after):
  """Every trainable leaf changed, every frozen one is bit-identical, and the
  optimizer holds state (Adam's mu and nu) for the trainable leaves alone."""
  for p, v in before.items():
    if p in adapted.trainable:
      assert not np.array_equal(after[p], v), f'{p} did not train'
    else:
      np.testing.assert_array_equal(after[p], v, err_msg=p)  # frozen: bit-identical
  state_shapes = sorted(x.shape for x in jax.tree.leaves(state['opt_state']) if x.ndim)
  assert state_shapes == sorted([v.shape for v in paths.flatten(state['trainable']).values()] * 2)
  assert optim.state_bytes(state['opt_state']) < 3 * 4 * paths.count(state['trainable'])


def _loss(model, adapted, task, batch):
  trainable, frozen = paths.split(adapted.params, adapted.trainable)

  def loss(trainable):
    out = adapted.module.apply({'params': paths.join(trainable, frozen)},
                               *inputs_for(model)(batch), train=True,
                               rngs={'dropout': jax.random.PRNGKey(0)})
    return task.loss_and_metrics(out, batch)[0]
  return loss, trainable


def _shapes_made(jaxpr):
  """Every shape an equation of `jaxpr` (and its sub-jaxprs) produces."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(v.aval.shape) for v in eqn.outvars]
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          shapes += _shapes_made(sub)
  return shapes


@pytest.mark.parametrize('method', ['lora', 'dora', 'full'])
def test_training_never_forms_a_full_size_weight(zoo, method):
  """GPT-2's fused c_attn kernel is (32, 96): nothing that shape is computed."""
  model = zoo['gpt2-tiny']
  cfg = peft_config(method)
  adapted = peft.adapt(model, cfg)
  batch = text_batch(model, labels=False)
  loss, trainable = _loss(model, adapted, tasks.CausalLM(), batch)
  grads = jax.eval_shape(jax.grad(loss), trainable)
  kernel = (32, 96)
  made = _shapes_made(jax.make_jaxpr(jax.value_and_grad(loss))(trainable).jaxpr)
  if method == 'full':  # the control: full fine-tuning does form the kernel gradient
    assert kernel in made
    return
  assert all(p.rsplit('/', 1)[-1] in lora.LEAVES for p in paths.flatten(grads))
  assert kernel not in made


def test_trainable_counts(zoo):
  r = 4
  bert = zoo['bert-tiny']  # 2 layers, width 32; q and v: 2 targets per layer
  adapted = peft.adapt(bert, peft_config(rank=r))
  head = paths.count(bert.params['head'])
  added = paths.count(adapted.params) - paths.count(bert.params)
  assert added == 2 * 2 * r * (32 + 32)
  assert paths.count(paths.split(adapted.params, adapted.trainable)[0]) == added + head
  dora = peft.adapt(bert, peft_config('dora', rank=r))
  assert paths.count(dora.params) - paths.count(bert.params) == 2 * 2 * (r * 64 + 32)
  # GPT-2's fused qkv: one target per layer, (32 -> 96). No head trains: it is the LM's.
  gpt2 = zoo['gpt2-tiny']
  adapted = peft.adapt(gpt2, peft_config(rank=r))
  assert paths.count(paths.split(adapted.params, adapted.trainable)[0]) == 2 * r * (32 + 96)
  # A ResNet 3x3 conv (8 -> 8): A is (3, 3, 8, r), B (r, 8).
  resnet = zoo['resnet-tiny']
  adapted = peft.adapt(resnet, peft_config(rank=r, targets=('stage2_block1/conv2$',)))
  flat = paths.flatten(adapted.params)
  assert flat['stage2_block1/conv2/lora_a'].shape == (3, 3, 8, r)
  assert flat['stage2_block1/conv2/lora_b'].shape == (r, 8)
  assert paths.count(adapted.params) - paths.count(resnet.params) == r * (9 * 8 + 8)
  # Per-target rank overrides: the first matching pattern wins.
  adapted = peft.adapt(bert, peft_config(rank=r, rank_overrides=(
      ('layer_1/.*query', 2), ('query', 3))))
  flat = paths.flatten(adapted.params)
  assert flat['layer_1/attention/self/query/lora_a'].shape == (32, 2)
  assert flat['layer_0/attention/self/query/lora_a'].shape == (32, 3)
  assert flat['layer_0/attention/self/value/lora_a'].shape == (32, r)


def test_init_and_dora_magnitude(zoo):
  bert = zoo['bert-tiny']
  flat = paths.flatten(peft.adapt(bert, peft_config('dora', rank=4)).params)
  query = 'layer_0/attention/self/query'
  w = np.asarray(flat[f'{query}/kernel'])
  np.testing.assert_allclose(flat[f'{query}/{lora.MAGNITUDE}'], np.linalg.norm(w, axis=0),
                             rtol=1e-6)
  np.testing.assert_array_equal(flat[f'{query}/{lora.B}'], 0)
  a = np.asarray(flat[f'{query}/{lora.A}'])
  # kaiming-uniform with a=sqrt(5): U(+-1/sqrt(fan_in)).
  assert np.abs(a).max() <= 1 / np.sqrt(32) and a.std() > 0.1 / np.sqrt(32)
  flat = paths.flatten(peft.adapt(bert, peft_config(rank=4, init='gaussian')).params)
  assert 0.15 < np.asarray(flat[f'{query}/{lora.A}']).std() < 0.35  # N(0, 1/r)
  resnet = zoo['resnet-tiny']
  flat = paths.flatten(peft.adapt(resnet, peft_config('dora', rank=2)).params)
  w = np.asarray(flat['stage2_block1/conv2/kernel'])
  np.testing.assert_allclose(flat['stage2_block1/conv2/' + lora.MAGNITUDE],
                             np.sqrt((w ** 2).sum((0, 1, 2))), rtol=1e-6)


def test_family_defaults_and_head(zoo):
  def targets(alias, **kw):
    flat = paths.flatten(peft.adapt(zoo[alias], peft_config(**kw)).params)
    return sorted(lora.adapted_modules(flat))
  assert targets('llama-tiny')[:2] == ['layers_0/self_attn/q_proj', 'layers_0/self_attn/v_proj']
  assert targets('vit-tiny')[:2] == ['encoderblock_0/attention/query',
                                     'encoderblock_0/attention/value']
  assert targets('resnet-tiny', rank=2)[:3] == [
      'stage1_block1/conv1', 'stage1_block1/conv2', 'stage1_block1/conv3']
  # The head trains in full; it is no LoRA target even if a pattern would match it.
  adapted = peft.adapt(zoo['vit-tiny'], peft_config(targets=('.',), rank=2))
  assert {'head/kernel', 'head/bias'} <= adapted.trainable
  assert not any(p.startswith('head/lora') for p in paths.flatten(adapted.params))


# ------------------------------------------------------------------ bad input


def test_pattern_matching_nothing_lists_the_candidates(zoo):
  with pytest.raises(ValueError) as e:
    peft.adapt(zoo['bert-tiny'], peft_config(targets=('query', 'attention.self.vaule')))
  message = str(e.value)
  assert "['attention.self.vaule'] match no nn.Dense/nn.Conv module" in message
  assert 'layer_0/attention/self/value' in message  # nearest
  assert 'layer_*/attention/self/query' in message and 'pooler/dense' in message  # all
  assert "head 'head/' trains in full" in message and 'targets=' in message
  with pytest.raises(ValueError, match=r"'\(' is not a valid regex"):
    peft.adapt(zoo['bert-tiny'], peft_config(targets=('(',)))
  with pytest.raises(ValueError, match='rank_overrides: .qury. matches none of the LoRA targets'):
    peft.adapt(zoo['bert-tiny'], peft_config(rank_overrides=(('qury', 2),)))


def test_rank_larger_than_the_layer_is_refused(zoo):
  with pytest.raises(ValueError, match=re.escape(
      "'stage1_block1/conv1' kernel (1, 1, 8, 4) allows 4, rank 8 asked")) as e:
    peft.adapt(zoo['resnet-tiny'], peft_config())  # the default rank 8
  assert 'peft.lora.rank_overrides' in str(e.value)
  with pytest.raises(ValueError, match=r'rank=0 must be a positive integer.*init=.xavier'):
    peft.adapt(zoo['bert-tiny'], peft_config(rank=0, init='xavier'))


def test_a_layer_lora_cannot_adapt_is_named():
  model = models.load_pretrained('efficientnet-lite-tiny', num_classes=3)
  adapted = peft.adapt(model, peft_config(targets=('blocks_0/depthwise_conv',), rank=2))
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="selected 'blocks_0/depthwise_conv', a DepthwiseConv"):
    jax.eval_shape(adapted.module.apply, {'params': adapted.params}, x)
  assert architecture.of(model).has('conv')  # the default role: its 1x1 convs
  defaults = peft.adapt(model, peft_config())
  jax.eval_shape(defaults.module.apply, {'params': defaults.params}, x)


# ------------------------------------------------------------------ HF PEFT parity


@pytest.fixture(scope='module')
def hf_bert(tmp_path_factory):
  """A randomised transformers BertModel, saved, and our load of it."""
  import torch
  from transformers import BertConfig, BertModel
  torch.manual_seed(0)
  hf = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=37,
                            max_position_embeddings=40))
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(torch.rand_like(p) + 0.5 if 'LayerNorm.weight' in name
              else 0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp('hf') / 'bert'
  hf.eval().save_pretrained(path)
  tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(94)]
  (path / 'vocab.txt').write_text('\n'.join(tokens) + '\n')
  return hf, models.load_pretrained(str(path))


@pytest.mark.parametrize('variant', ['lora', 'rslora', 'dora'])
def test_outputs_match_hf_peft(hf_bert, variant):
  import torch
  from peft import LoraConfig, get_peft_model
  hf, ours = hf_bert
  config = LoraConfig(r=4, lora_alpha=8, target_modules=['query', 'value'],
                      init_lora_weights=False, use_rslora=variant == 'rslora',
                      use_dora=variant == 'dora')
  torch.manual_seed(1)
  hf_peft = get_peft_model(copy.deepcopy(hf), config).eval()
  with torch.no_grad():
    for name, p in hf_peft.named_parameters():
      if 'lora_magnitude_vector' in name:
        p.mul_(torch.rand_like(p) + 0.5)  # away from ||W + sAB||, so m shows
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 99, (2, 9))
  mask = np.array([[1] * 9, [1] * 6 + [0] * 3])
  with torch.no_grad():
    expected = hf_peft(input_ids=torch.from_numpy(ids),
                       attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()

  method = 'dora' if variant == 'dora' else 'lora'
  adapted = peft.adapt(ours, peft_config(method, rank=4, alpha=8.0, rslora=variant == 'rslora',
                                         targets=('query', 'value')))
  flat = paths.flatten(adapted.params)
  leaf = {'lora_A': lora.A, 'lora_B': lora.B, 'lora_magnitude_vector': lora.MAGNITUDE}
  mapped = set()
  for name, value in hf_peft.state_dict().items():
    m = re.search(r'layer\.(\d+)\.attention\.self\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector)'
                  r'\.default\.weight$', name)
    if m:
      key = f'layer_{m[1]}/attention/self/{m[2]}/{leaf[m[3]]}'
      value = value.numpy()
      value = value.T if value.ndim == 2 else value  # torch (out, in) -> our (in, out)
      assert flat[key].shape == value.shape, key
      flat[key] = jnp.asarray(value)
      mapped.add(key)
  assert mapped == {p for p in flat if p.rsplit('/', 1)[-1] in lora.LEAVES}
  out = jax.jit(adapted.module.apply)({'params': paths.unflatten(flat)}, ids, mask)
  got = np.asarray(out['last_hidden_state'])
  assert np.abs(got - expected).max() <= 1e-4
  with torch.no_grad():
    base = hf(input_ids=torch.from_numpy(ids),
              attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  assert np.abs(base - expected).max() > 1e-2, 'the adapter changes the outputs'
