"""Every registered architecture x every registered method, as vit_jax's
`test_all_tested`: a pair the method applies to adapts, takes a train step
that moves trainable params only, and round-trips through the method's Hugging
Face format where the architecture has one; any other pair is refused as not
applicable. A new architecture or method is tested the day it is registered.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from finetune_jax import base_config
from finetune_jax import errors
from finetune_jax import models
from finetune_jax import optim
from finetune_jax import peft
from finetune_jax import steps
from finetune_jax import tasks
from finetune_jax.models import architecture
from finetune_jax.peft import hf_format
from finetune_jax.peft import method as method_lib
from finetune_jax.peft import paths

ARCHITECTURES = [a.name for a in architecture.all_architectures()]
METHODS = method_lib.names()
CLASSES = 3


@pytest.fixture(scope='module')
def zoo():
  """{architecture: its '-tiny' model}: a classifier, or a language model's own head."""
  out = {}
  for alias in models.list_aliases():
    if alias.endswith('-tiny'):
      model = models.load_pretrained(alias)
      name = model.config['model']
      if not architecture.of(model).decoder:
        model = models.load_pretrained(alias, num_classes=CLASSES)
      out[name] = model
  return out


def test_every_architecture_has_a_tiny_model(zoo):
  assert sorted(zoo) == ARCHITECTURES


def test_every_method_applies_to_some_architecture(zoo):
  for name in METHODS:
    assert any(method_lib.get(name).applies(m) for m in zoo.values()), name


def _config(method):
  c = base_config.get_config().peft
  c.method = method
  c.num_frozen_blocks = 1
  c.lora.rank = 2
  c.adapter.size = 4
  c.prompt_tuning.num_virtual_tokens = c.prefix_tuning.num_virtual_tokens = 2
  return c


def _batch_and_task(model):
  rng = np.random.default_rng(0)
  if model.preprocess is not None:
    images = rng.integers(0, 255, (4, 32, 32, 3)).astype(np.uint8)
    return ({'image': images, 'label': np.arange(4, dtype=np.int32) % CLASSES},
            tasks.ImageClassification(CLASSES), lambda b: (model.preprocess(b['image']),))
  ids = rng.integers(1, model.config['vocab_size'], (4, 8)).astype(np.int32)
  mask = np.ones_like(ids)
  batch = {'input_ids': ids, 'attention_mask': mask, 'loss_mask': mask,
           'label': np.arange(4, dtype=np.int32) % CLASSES}
  task = tasks.TextClassification(CLASSES) if model.config.get('num_classes') else tasks.CausalLM()
  return batch, task, lambda b: (b['input_ids'], b['attention_mask'])


def _outputs(module, params, inputs):
  out = jax.jit(module.apply)({'params': params}, *inputs)
  return np.asarray(out['logits'])


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('arch', ARCHITECTURES)
def test_pair(zoo, arch, method, tmp_path):
  model, chosen = zoo[arch], method_lib.get(method)
  if not chosen.applies(model):
    with pytest.raises(errors.NotApplicable) as e:
      peft.adapt(model, _config(method))
    assert e.value.option == 'peft.method'
    return
  adapted = peft.adapt(model, _config(method))
  # lp_ft hands the adaptation to its body method (full), which answers for it.
  assert adapted.method is chosen or adapted.method.body is method_lib.get('full')

  # One train step: only trainable params move, and only they have optimizer state.
  batch, task, inputs = _batch_and_task(model)
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optax.adam(1e-2)
  state = {'step': jnp.int32(0), 'rng': jax.random.PRNGKey(0), 'trainable': trainable,
           'opt_state': tx.init(trainable)}
  step = jax.jit(steps.make_train_step(adapted.module, inputs, task, tx, None))
  new_state, metrics = step(state, frozen, batch)
  assert np.isfinite(float(metrics['loss']))
  before, after = paths.flatten(trainable), paths.flatten(new_state['trainable'])
  assert after.keys() == adapted.trainable
  assert any(not np.array_equal(before[p], after[p]) for p in before)
  assert optim.state_bytes(new_state['opt_state']) <= 2 * 4 * paths.count(trainable) + 64
  trained = paths.join(new_state['trainable'], frozen)

  hf = architecture.of(model).hf
  if hf is None:
    return
  args = inputs(batch)
  # HF PEFT's layout, where PEFT has the method: written, read back, identical.
  if chosen.peft_types:
    out = tmp_path / 'peft'
    if method == 'prefix_tuning' and hf.no_prefix_why:
      with pytest.raises(ValueError, match='no HF PEFT export'):
        hf_format.save_peft(model, adapted, trained, str(out), method=method)
    else:
      hf_format.save_peft(model, adapted, trained, str(out), method=method)
      loaded = hf_format.load_adapter(peft.adapt(model, _config(method)), model, str(out))
      for p, v in paths.flatten(loaded.params).items():
        np.testing.assert_allclose(v, paths.flatten(trained)[p], rtol=0, atol=0, err_msg=p)
  # The merged transformers dir, where the method folds: loads as a plain model
  # that computes what the adapted one does.
  if chosen.mergeable:
    out = tmp_path / 'merged'
    hf_format.save_merged(model, adapted, trained, str(out), method=method)
    options = {'pooling': model.config['pooling']} if 'pooling' in model.config else {}
    plain = models.load_pretrained(str(out), num_classes=model.config.get('num_classes'),
                                   **options)
    np.testing.assert_allclose(_outputs(plain.module, plain.params, args),
                               _outputs(adapted.module, trained, args), rtol=1e-4, atol=1e-5)
