"""parallel='fsdp': one program over a ('data', 'fsdp') mesh with the state sharded, giving
pmap's results, and checkpoints that move between the two."""
import os
import shutil

import jax
import numpy as np
import pytest

from finetune_jax import optim
from finetune_jax import parallel
from finetune_jax import peft
from finetune_jax import train
from finetune_jax.peft import paths
from test_grad_accum import _setups
from test_grad_accum import _train
from test_grad_accum import assert_same_training
from test_main import tiny_config


@pytest.mark.parametrize('name,mesh', [('toy_full', (1, 8)), ('llama_lora', (2, 4))])
def test_fsdp_trains_as_pmap_does(name, mesh):
  reference = _train(name, parallel.Pmap(jax.local_devices()), accum=1)[1:]
  assert_same_training(_train(name, parallel.Fsdp(jax.devices(), mesh), accum=1)[1:], reference)


def _placed(method):
  """(Fsdp, placed state, placed frozen params) of llama-tiny under `method`."""
  model, config = _setups()['llama_lora'][:2]
  config.peft.method = method
  adapted = peft.adapt(model, config.peft)
  trainable, frozen = paths.split(adapted.params, adapted.trainable)
  tx = optim.make_optimizer(config, trainable, model.head)
  state = {'trainable': trainable, 'opt_state': tx.init(trainable)}
  strategy = parallel.Fsdp(jax.devices())
  return strategy, strategy.place(state), strategy.place(frozen)


def _bytes(tree, device_zero_only):
  leaves = jax.tree.leaves(tree)
  if device_zero_only:
    return sum(x.addressable_shards[0].data.nbytes for x in leaves)
  return sum(x.nbytes for x in leaves)


def test_each_device_holds_an_eighth_of_the_params_and_optimizer_state():
  _, state, _ = _placed('full')
  per_device, whole = _bytes(state, True), _bytes(state, False)
  assert abs(per_device - whole / 8) <= 0.1 * whole / 8, (per_device, whole)


def test_frozen_params_are_sharded_too():
  _, _, frozen = _placed('lora')
  per_device, whole = _bytes(frozen, True), _bytes(frozen, False)
  assert abs(per_device - whole / 8) <= 0.1 * whole / 8, (per_device, whole)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(frozen)}
  assert any('fsdp' in spec for spec in specs), specs


def test_fsdp_spec_shards_the_largest_divisible_axis():
  assert parallel.fsdp_spec((576, 1536), 8) == jax.sharding.PartitionSpec(None, 'fsdp')
  assert parallel.fsdp_spec((49152, 576), 8) == jax.sharding.PartitionSpec('fsdp')
  assert parallel.fsdp_spec((3, 5), 8) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((), 8) == jax.sharding.PartitionSpec()


def test_a_mesh_that_does_not_divide_the_devices_is_refused():
  with pytest.raises(ValueError, match=r'mesh=\(data=3, fsdp=-1\) does not divide the 8 devices'):
    parallel.make('fsdp', (3, -1))


def test_checkpoints_move_between_pmap_and_fsdp(tmp_path):
  """pmap writes steps 2 and 4; fsdp resumes from 2 and writes 4; pmap reads fsdp's 4."""
  config = lambda parallel_: tiny_config(total_steps=4, eval_every=4, checkpoint_every=2,
                                         batch_size=32, parallel=parallel_)
  final = train.train_and_evaluate(config('pmap'), str(tmp_path))['final']

  def drop_last_step():
    os.remove(tmp_path / 'results.json')
    for entry in (tmp_path / 'checkpoints').iterdir():
      if entry.name == '4':
        shutil.rmtree(entry)

  drop_last_step()
  resumed = train.train_and_evaluate(config('fsdp'), str(tmp_path))['final']  # from pmap's 2
  os.remove(tmp_path / 'results.json')
  restored = train.train_and_evaluate(config('pmap'), str(tmp_path))['final']  # fsdp's 4
  for metrics in (resumed, restored):
    np.testing.assert_allclose(metrics['eval_loss'], final['eval_loss'], rtol=1e-4)
    np.testing.assert_allclose(metrics['eval_accuracy'], final['eval_accuracy'], atol=1e-3)
