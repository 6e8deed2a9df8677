"""Data parallelism over the local devices, behind one small interface.

`pmap` (the default) runs one replica of the step per device and averages
gradients with `lax.pmean`; `jit` compiles one program over a device mesh and
lets XLA insert the reductions. Both split the global batch over devices, so
the step function sees a per-device batch under pmap and the global batch
under jit; it reduces with `axis_name` when one is given.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'batch'


class Pmap:
  """pmap over the local devices; state and frozen params are replicated."""
  axis_name = AXIS

  def __init__(self, devices=None):
    self.devices = devices or jax.local_devices()
    self.num_devices = len(self.devices)
    # The sharding pmap gives its outputs: inputs placed the same way keep
    # the step from compiling a second time on its second call.
    self._sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), P(AXIS))

  def replicate(self, tree):
    def put(x):
      x = jax.numpy.asarray(x)[None]
      copies = [jax.device_put(x, d) for d in self.devices]
      return jax.make_array_from_single_device_arrays(
          (self.num_devices,) + x.shape[1:], self._sharding, copies)
    return jax.tree.map(put, tree)

  def unreplicate(self, tree):
    """Device 0's copy, on the host. Every leaf has the leading device axis."""
    return jax.device_get(jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree))

  def shard(self, batch):
    """[global_batch, ...] -> [devices, global_batch // devices, ...]."""
    return jax.tree.map(
        lambda x: x.reshape((self.num_devices, -1) + x.shape[1:]), batch)

  def compile_train(self, step):
    return jax.pmap(step, axis_name=AXIS, devices=self.devices, donate_argnums=(0,))

  def compile_eval(self, step):
    return jax.pmap(step, axis_name=AXIS, devices=self.devices)


class Jit:
  """jit over a 1-D mesh of all devices: batch sharded, params replicated."""
  axis_name = None

  def __init__(self, devices=None):
    self.mesh = Mesh(np.array(devices or jax.devices()), (AXIS,))
    self.num_devices = self.mesh.size
    self._replicated = NamedSharding(self.mesh, P())
    self._sharded = NamedSharding(self.mesh, P(AXIS))

  def replicate(self, tree):
    return jax.device_put(tree, self._replicated)

  def unreplicate(self, tree):
    return jax.device_get(tree)

  def shard(self, batch):
    return jax.device_put(batch, self._sharded)

  def compile_train(self, step):
    return jax.jit(step, donate_argnums=(0,),
                   out_shardings=(self._replicated, self._replicated))

  def compile_eval(self, step):
    return jax.jit(step, out_shardings=self._replicated)


STRATEGIES = {'pmap': Pmap, 'jit': Jit}


def make(name: str):
  if name not in STRATEGIES:
    raise ValueError(f'Unknown parallel={name!r}; use one of {sorted(STRATEGIES)}.')
  return STRATEGIES[name]()
