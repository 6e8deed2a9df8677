"""Data parallelism and FSDP over the devices, behind one small interface.

`pmap` (the default) runs one replica of the step per device and sums
gradients with `lax.psum` (steps.py divides by the global count); `jit`
compiles one program over a device mesh and lets XLA insert the reductions;
`fsdp` is `jit` over a ('data', 'fsdp') mesh with params, gradients and
optimizer state sharded along 'fsdp' (each leaf along its largest axis that
the 'fsdp' size divides) and the batch over both axes. All split the global batch over devices, so the step function sees a
per-device batch under pmap and the global batch otherwise; it reduces with
`axis_name` when one is given.

`place` puts a tree (state or frozen params) on the devices; `to_host` brings
it back whole; `checkpointable` is what a checkpoint saves, and orbax restores
into it with the same layout.
"""
import jax
from jax.experimental import multihost_utils
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

  def place(self, tree):
    def put(x):
      x = jax.numpy.asarray(x)[None]
      copies = [jax.device_put(x, d) for d in self.devices]
      return jax.make_array_from_single_device_arrays(
          (self.num_devices,) + x.shape[1:], self._sharding, copies)
    return jax.tree.map(put, tree)

  def to_host(self, tree):
    """Device 0's copy, on the host. Every leaf has the leading device axis."""
    return jax.device_get(jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree))

  def checkpointable(self, tree):
    return self.to_host(tree)

  def restore_target(self, tree):
    """What orbax restores a host `tree`'s checkpoint into: host arrays, placed later."""
    return tree

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

  def place(self, tree):
    return jax.device_put(tree, self._replicated)

  def to_host(self, tree):
    return jax.device_get(tree)

  def checkpointable(self, tree):
    return tree

  def restore_target(self, tree):
    return _abstract(tree, lambda x: self._replicated)

  def shard(self, batch):
    return _global_batch(batch, self._sharded)

  def compile_train(self, step):
    return jax.jit(step, donate_argnums=(0,),
                   out_shardings=(self._replicated, self._replicated))

  def compile_eval(self, step):
    return jax.jit(step, out_shardings=self._replicated)


def _global_batch(batch, sharding):
  """One global array per leaf: from the whole batch in one process, or from each process's
  own rows (data.process_rows) in a run of several."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def _abstract(tree, sharding_of):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                                     sharding=sharding_of(x)), tree)


def fsdp_spec(shape, size: int) -> P:
  """Shards the largest axis that `size` divides (the first of equals); scalars and leaves
  with no such axis stay replicated."""
  axes = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
  if size == 1 or not axes:
    return P()
  axis = max(axes, key=lambda i: (shape[i], -i))
  return P(*[None] * axis, 'fsdp')


class Fsdp:
  """jit over a ('data', 'fsdp') mesh: params, gradients and optimizer state sharded along
  'fsdp', frozen params too, the batch along both axes. `mesh_shape` = (data, fsdp); -1 in
  one place takes the devices the other leaves."""
  axis_name = None

  def __init__(self, devices=None, mesh_shape=(1, -1)):
    devices = devices or jax.devices()
    self.mesh = Mesh(np.array(devices).reshape(resolve_mesh(mesh_shape, len(devices))),
                     ('data', 'fsdp'))
    self.num_devices = self.mesh.size
    self.fsdp_size = self.mesh.shape['fsdp']
    self._replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(('data', 'fsdp')))

  def sharding(self, x) -> NamedSharding:
    return NamedSharding(self.mesh, fsdp_spec(np.shape(x), self.fsdp_size))

  def place(self, tree):
    return jax.tree.map(lambda x: jax.device_put(x, self.sharding(x)), tree)

  def to_host(self, tree):
    """The whole tree on every process's host (an all-gather across processes)."""
    if jax.process_count() == 1:
      return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)

  def checkpointable(self, tree):
    return tree

  def restore_target(self, tree):
    """Abstract arrays in this layout: orbax reads each shard onto its device."""
    return _abstract(tree, self.sharding)

  def shard(self, batch):
    return _global_batch(batch, self.batch_sharding)

  def _constrain(self, tree):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.sharding(x)), tree)

  def compile_train(self, step):
    def sharded_step(state, frozen, batch):  # the new state keeps the state's layout
      new_state, metrics = step(state, frozen, batch)
      return (self._constrain(new_state),
              jax.lax.with_sharding_constraint(metrics, self._replicated))
    return jax.jit(sharded_step, donate_argnums=(0,))

  def compile_eval(self, step):
    return jax.jit(step, out_shardings=self._replicated)


def resolve_mesh(mesh_shape, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) with a -1 resolved; a ValueError naming the fix if it does not fit."""
  data, fsdp = mesh_shape
  if data == -1 and fsdp > 0 and num_devices % fsdp == 0:
    data = num_devices // fsdp
  elif fsdp == -1 and data > 0 and num_devices % data == 0:
    fsdp = num_devices // data
  if data <= 0 or fsdp <= 0 or data * fsdp != num_devices:
    raise ValueError(f'mesh=(data={mesh_shape[0]}, fsdp={mesh_shape[1]}) does not divide the '
                     f'{num_devices} devices: make data x fsdp = {num_devices}, or set one of '
                     'them to -1 (--config.mesh.fsdp=-1).')
  return data, fsdp


STRATEGIES = {'pmap': Pmap, 'jit': Jit, 'fsdp': Fsdp}


def make(name: str, mesh_shape=(1, -1)):
  if name not in STRATEGIES:
    raise ValueError(f'Unknown parallel={name!r}; use one of {sorted(STRATEGIES)}.')
  return Fsdp(mesh_shape=mesh_shape) if name == 'fsdp' else STRATEGIES[name]()
