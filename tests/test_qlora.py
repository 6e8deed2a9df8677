"""peft.quantize_base: LoRA (and the other added-param methods) on a quantized frozen base."""
import contextlib
import io

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from gguf import GGMLQuantizationType as Q

from finetune_jax import base_config
from finetune_jax import errors
from finetune_jax import models
from finetune_jax import optim
from finetune_jax import peft
from finetune_jax import quantized
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax import train
from finetune_jax.peft import hf_format
from finetune_jax.peft import paths
import test_gguf
from test_main import tiny_config


def _config(mode, method='lora'):
  c = base_config.get_config()
  c.peft.method, c.peft.quantize_base = method, mode
  c.warmup_steps, c.learning_rate = 0, 1e-2
  return c


def _setup(mode, method='lora', pretrained='llama-tiny'):
  c = _config(mode, method)
  model = models.load_pretrained(pretrained, keep_quantized=mode != 'none')
  adapted = peft.adapt(model, c.peft)
  state, frozen, tx = train.initial_state(c, model, adapted)
  return model, adapted, state, frozen, tx


def _batch(i):
  ids = np.random.default_rng(i).integers(0, 257, (8, 32)).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': np.ones_like(ids), 'loss_mask': np.ones_like(ids)}


def _losses(mode, method='lora', num_steps=5, pretrained='llama-tiny'):
  _, adapted, state, frozen, tx = _setup(mode, method, pretrained)
  step = jax.jit(steps.make_train_step(adapted.module, lambda b: (b['input_ids'],
                                                                   b['attention_mask']),
                                       tasks.CausalLM(), tx, None))
  losses = []
  for i in range(num_steps):
    state, metrics = step(state, frozen, _batch(i))
    losses.append(float(metrics['loss'] / metrics['count']))
  return losses, state


@pytest.mark.parametrize('mode,qtype,ratio', [('int8', 'int8', 3.5), ('nf4', 'uint4', 6.0)])
def test_frozen_dense_kernels_are_held_quantized(mode, qtype, ratio):
  _, adapted, state, frozen, _ = _setup(mode)
  kernels = {p: v for p, v in paths.flatten(frozen).items() if p.endswith('_proj/kernel')}
  assert kernels and all(isinstance(v, qwix.QArray) for v in kernels.values())
  assert {str(v.qvalue.dtype) for v in kernels.values()} == {qtype}
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(state['trainable']))
  float_bytes = sum(4 * np.prod(v.qvalue.shape) for v in kernels.values())
  held = optim.state_bytes(kernels)  # 4-bit values at half a byte, as XLA holds them
  assert float_bytes >= ratio * held, (float_bytes, held)


@pytest.mark.parametrize('mode,method,rtol', [('int8', 'lora', 1e-3), ('nf4', 'lora', 1e-2),
                                              ('nf4', 'ia3', 1e-2)])
def test_training_on_the_quantized_base_tracks_the_float_base(mode, method, rtol):
  reference, _ = _losses('none', method)
  losses, state = _losses(mode, method)
  np.testing.assert_allclose(losses, reference, rtol=rtol)
  _, _, start, _, _ = _setup(mode, method)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state['trainable']),
                                                 jax.tree.leaves(start['trainable']))]
  assert any(moved)


def test_a_4bit_gguf_base_trains_on_the_files_own_blocks(tmp_path):
  """A GGUF whose Linear weights are Q4_1 and tied embedding Q8_0, as SmolLM2's: nf4 keeps
  the file's blocks (no float copy, no second rounding), so LoRA trains exactly as on the
  float read of the same file; int8 quantizes the 4-bit kernels again, to its own width."""
  path = str(tmp_path / 'q4_1.gguf')
  types = {name: Q.Q4_1 for name, (hf, _) in test_gguf.TENSORS.items()
           if hf.endswith('_proj.weight') or hf == 'lm_head.weight'}
  test_gguf.write_gguf(path, test_gguf.hf_weights(tied=True), types=types)
  model, _, _, frozen, _ = _setup('nf4', pretrained=path)
  loaded, held = paths.flatten(model.params), paths.flatten(frozen)
  kernels = {p: v for p, v in held.items() if p.endswith('/kernel')}
  assert len(kernels) == len(types) - 1 == 14  # the LM head is the table (attend)
  assert all(v.qvalue.dtype == jnp.uint4 and v is loaded[p] for p, v in kernels.items())
  table = held['embed_tokens/embedding']
  assert isinstance(table, quantized.BlockQuantized) and table.qvalue.dtype == jnp.int8
  reference, trained_on_floats = _losses('none', pretrained=path, num_steps=3)
  losses, trained = _losses('nf4', pretrained=path, num_steps=3)
  np.testing.assert_allclose(losses, reference, rtol=1e-6)
  # The merged export dequantizes the blocks: the float read's merged model, to float rounding.
  merged = {}
  for mode, state in (('none', trained_on_floats), ('nf4', trained)):
    _, adapted, _, frozen, _ = _setup(mode, pretrained=path)
    merged[mode] = paths.flatten(hf_format.merged_params(
        adapted, paths.join(state['trainable'], frozen), method='lora'))
  assert merged['nf4'].keys() == merged['none'].keys()
  for p, v in merged['nf4'].items():
    np.testing.assert_allclose(v, merged['none'][p], rtol=1e-5, atol=1e-6, err_msg=p)
  _, _, _, frozen, _ = _setup('int8', pretrained=path)
  assert all(isinstance(v, qwix.QArray) and v.qvalue.dtype == jnp.int8
             for p, v in paths.flatten(frozen).items() if p.endswith('/kernel'))


@pytest.fixture(scope='module')
def untied_4bit_gguf(tmp_path_factory):
  """A GGUF with every Linear weight in Q4_1, its own LM head included, the table in Q8_0."""
  path = str(tmp_path_factory.mktemp('gguf') / 'untied_q4_1.gguf')
  types = {name: Q.Q4_1 for name, (hf, _) in test_gguf.TENSORS.items()
           if hf.endswith('_proj.weight') or hf == 'lm_head.weight'}
  test_gguf.write_gguf(path, test_gguf.hf_weights(), types=types)
  return path


@pytest.mark.parametrize('method', ['lora', 'dora', 'ia3', 'adapter', 'prompt_tuning',
                                    'prefix_tuning', 'linear_probe'])
def test_every_method_that_freezes_the_base_starts_as_on_the_float_read(method,
                                                                        untied_4bit_gguf):
  """Each method's init reads the base its own way (DoRA's norms, the prompt's table rows,
  the prefix's forward pass, the probe's head, which trains and so is floats): on the file's
  blocks it starts from the model it starts from on the float read."""
  ids = np.arange(3, 19, dtype=np.int32)[None]
  outputs = {}
  for mode in ('none', 'nf4'):
    _, adapted, state, frozen, _ = _setup(mode, method, pretrained=untied_4bit_gguf)
    outputs[mode] = adapted.module.apply({'params': paths.join(state['trainable'], frozen)},
                                         ids, np.ones_like(ids), train=False)['logits']
  assert all(not quantized.is_quantized(v) for v in jax.tree.leaves(
      state['trainable'], is_leaf=quantized.is_quantized))
  np.testing.assert_allclose(outputs['nf4'], outputs['none'], rtol=1e-5, atol=1e-5)


def test_the_backward_pass_keeps_no_float_copy_of_a_kernel():
  model, adapted, state, frozen, _ = _setup('int8')
  shapes = {tuple(v.qvalue.shape) for v in jax.tree.leaves(
      frozen, is_leaf=lambda x: isinstance(x, qwix.QArray)) if isinstance(v, qwix.QArray)}
  batch = _batch(0)

  def loss(trainable):
    outputs = adapted.module.apply({'params': paths.join(trainable, frozen)},
                                   batch['input_ids'], batch['attention_mask'], train=True)
    return tasks.CausalLM().loss_and_metrics(outputs, batch)[0]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ad_checkpoint.print_saved_residuals(loss, state['trainable'])
  residuals = [line.split(' ')[0] for line in printed.getvalue().splitlines()]
  as_float = {f'f32[{",".join(map(str, s))}]' for s in shapes}
  as_int8 = {f'i8[{",".join(map(str, s))}]' for s in shapes}
  assert not as_float & set(residuals), residuals
  assert as_int8 & set(residuals)


@pytest.mark.parametrize('method', ['full', 'bitfit', 'partial'])
def test_methods_that_train_the_base_are_refused_before_writing(method, tmp_path):
  config = tiny_config(peft={'method': method, 'num_frozen_blocks': 1, 'quantize_base': 'nf4'})
  with pytest.raises(errors.ConfigError, match=f'peft.method={method} trains them'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_the_merged_model_is_the_dequantized_base_plus_the_update():
  _, adapted, state, frozen, _ = _setup('int8')
  params = paths.join(state['trainable'], frozen)
  merged = paths.flatten(hf_format.merged_params(adapted, params, method='lora'))
  q = paths.flatten(frozen)['layers_0/mlp/down_proj/kernel']  # not a LoRA target: base alone
  np.testing.assert_array_equal(merged['layers_0/mlp/down_proj/kernel'], qwix.dequantize(q))
