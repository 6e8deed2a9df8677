"""Reads PyTorch checkpoints (.pth/.pt/.bin) into numpy, never running pickle code.

A `torch.save` file is a pickle whose tensors point at raw storages kept next
to it: in the zip format (torch >= 1.6) as `<prefix>/data/<key>` records, in
the legacy format as a run of `[int64 count][bytes]` blocks after the pickle.
Pickle can call any importable function, so we unpickle with a whitelist:
only containers and the few torch names that describe tensors and storages
resolve, each to a pure-numpy stand-in here. Anything else is refused before
it is called, with instructions to convert the file to safetensors.

torch is not imported at runtime.
"""
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from finetune_jax import errors

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


# Raised inside the reader, which does not know the file's path everywhere;
# `read_torch_checkpoint` re-raises them as the public errors, naming the file.
class _Corrupt(Exception):
  """Not a readable PyTorch checkpoint (truncated, corrupt, other)."""


class _Unsafe(Exception):
  """Pickles objects other than tensors and plain containers."""


# Element types by torch's names: `torch.FloatStorage` (typed storages) and
# `torch.float32` (the dtype argument of `_rebuild_tensor_v3`).
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64,
    'FloatStorage': np.float32,
    'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64,
    'ComplexDoubleStorage': np.complex128,
    'UntypedStorage': np.uint8,  # bytes; the tensor says what they hold
}
_TORCH_DTYPES = {
    'float64': np.float64, 'double': np.float64,
    'float32': np.float32, 'float': np.float32,
    'float16': np.float16, 'half': np.float16,
    'bfloat16': ml_dtypes.bfloat16,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn,
    'float8_e5m2': ml_dtypes.float8_e5m2,
    'float8_e4m3fnuz': ml_dtypes.float8_e4m3fnuz,
    'float8_e5m2fnuz': ml_dtypes.float8_e5m2fnuz,
    'int64': np.int64, 'long': np.int64,
    'int32': np.int32, 'int': np.int32,
    'int16': np.int16, 'short': np.int16,
    'int8': np.int8,
    'uint64': np.uint64, 'uint32': np.uint32, 'uint16': np.uint16,
    'uint8': np.uint8,
    'bool': np.bool_,
    'complex64': np.complex64, 'complex128': np.complex128,
}


def _convert_hint(path: str) -> str:
  return (
      f'To use it, convert it once in an environment where you trust the file: '
      f'`sd = torch.load({path!r}, weights_only=False)`; if that gives a module, '
      f'take `sd = sd.state_dict()`; then '
      f'`safetensors.torch.save_file({{k: v.contiguous() for k, v in sd.items()}}, '
      f'"model.safetensors")` and load the .safetensors file instead.')


# ---------------------------------------------------------------- stand-ins


class _Frozen:
  """Base of every object a pickle can reach: its BUILD opcode (setstate /
  setattr) must not be able to alter a validated size or offset, or a
  whitelisted function, so none of them has a __dict__ or accepts setattr."""
  __slots__ = ()

  def __setattr__(self, name, value):
    raise _Unsafe(
        f'the checkpoint pickle tries to set attribute {name!r} on a loader '
        f'object; it is not a plain state dict.')

  def _set(self, **fields):
    for name, value in fields.items():
      object.__setattr__(self, name, value)


class _StorageType(_Frozen):
  """Stands in for `torch.FloatStorage` etc.: just an element type."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str, dtype):
    self._set(name=name, dtype=np.dtype(dtype))


class _TorchDtype(_Frozen):
  """Stands in for `torch.float32` etc."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name: str):
    self._set(name=name, dtype=np.dtype(_TORCH_DTYPES[name]))


class _TensorClass(_Frozen):
  """Stands in for `torch.Tensor` / `torch.nn.Parameter` as a type argument."""
  __slots__ = ()


class _Storage(_Frozen):
  """A flat run of elements, filled from the file after unpickling."""
  __slots__ = ('key', 'dtype', 'numel', 'data', 'view_of')

  def __init__(self, key: str, dtype: np.dtype, numel: int, view_of=None):
    # data: 1-D array of `dtype`, set by the reader; view_of: (root storage,
    # element offset) for the legacy format's storage views.
    self._set(key=key, dtype=dtype, numel=numel, data=None, view_of=view_of)

  def fill(self, data: np.ndarray):
    self._set(data=data)

  def array(self) -> np.ndarray:
    if self.view_of is not None:
      root, offset = self.view_of
      item = self.dtype.itemsize
      raw = root.array().view(np.uint8)[offset * item:(offset + self.numel) * item]
      if raw.size != self.numel * item:
        raise _Corrupt(f'storage view {self.key!r} exceeds its storage.')
      return raw.view(self.dtype)
    if self.data is None:
      raise _Corrupt(f'storage {self.key!r} has no data in the file.')
    return self.data


def _is_index_tuple(value) -> bool:
  return isinstance(value, tuple) and all(
      type(v) is int and v >= 0 for v in value)  # pylint: disable=unidiomatic-typecheck


class _PendingTensor(_Frozen):
  """A tensor whose storage bytes have not been read yet."""
  __slots__ = ('storage', 'offset', 'size', 'stride', 'dtype')

  def __init__(self, storage, offset, size, stride, dtype=None):
    if not isinstance(storage, _Storage):
      raise _Corrupt(
          f'a tensor refers to {type(storage).__name__}, not a storage.')
    size, stride = tuple(size), tuple(stride)
    if not (_is_index_tuple(size) and _is_index_tuple(stride) and
            len(size) == len(stride) and _is_index_tuple((offset,))):
      raise _Corrupt(
          f'bad tensor layout: size {size!r:.100}, stride {stride!r:.100}, '
          f'offset {offset!r:.100}.')
    self._set(storage=storage, offset=offset, size=size, stride=stride,
              dtype=storage.dtype if dtype is None else np.dtype(dtype))

  def materialise(self) -> np.ndarray:
    flat = self.storage.array()
    if self.dtype != flat.dtype:  # untyped (byte) storage holding `dtype`
      if flat.nbytes % self.dtype.itemsize:
        raise _Corrupt(
            f'storage {self.storage.key!r} of {flat.nbytes} bytes does not hold '
            f'whole {self.dtype} elements.')
      flat = flat.view(self.dtype)
    if 0 in self.size:
      return np.zeros(self.size, self.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= flat.size:
      raise _Corrupt(
          f'tensor of size {self.size}, stride {self.stride}, offset {self.offset} '
          f'reads past the end of storage {self.storage.key!r} '
          f'({flat.size} elements): the file is corrupt or truncated.')
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * item for s in self.stride), writeable=False)
    return np.array(view, copy=True, order='C')  # contiguous, owned, writable


class _Function(_Frozen):
  """A whitelisted callable; unlike a plain function it has no settable
  attributes (__defaults__, __code__ ...) for a pickle to tamper with."""
  __slots__ = ('fn',)

  def __init__(self, fn):
    self._set(fn=fn)

  def __call__(self, *args):
    try:
      return self.fn(*args)
    except TypeError as e:  # wrong arity from a crafted pickle
      raise _Corrupt(f'bad arguments to {self.fn.__name__}: {e}') from None


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _TorchDtype):
    raise _Corrupt(f'bad tensor dtype {dtype!r:.100}.')
  return _PendingTensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _PendingTensor):
    raise _Corrupt('a parameter that wraps no tensor.')
  return data


def _make_whitelist() -> dict:
  """Fresh stand-ins per load, so one file can never affect the next."""
  rebuild = {name: _Function(fn) for name, fn in [
      ('_rebuild_tensor_v2', _rebuild_tensor_v2),
      ('_rebuild_tensor_v3', _rebuild_tensor_v3),
      ('_rebuild_parameter', _rebuild_parameter),
      ('_rebuild_parameter_with_state', _rebuild_parameter)]}
  tensor_class = _TensorClass()

  def rebuild_from_type_v2(func, new_type, args, state):
    """Tensor subclasses wrap their rebuild call; plain types only."""
    del state
    if new_type is not tensor_class or not any(func is f for f in rebuild.values()):
      raise _Corrupt('unsupported tensor subclass in checkpoint.')
    return func(*args)

  return {
      ('collections', 'OrderedDict'): collections.OrderedDict,
      **{('torch._utils', name): fn for name, fn in rebuild.items()},
      ('torch._tensor', '_rebuild_from_type_v2'): _Function(rebuild_from_type_v2),
      ('torch', 'Tensor'): tensor_class,
      ('torch.nn.parameter', 'Parameter'): tensor_class,
      **{('torch', n): _StorageType(n, t) for n, t in _STORAGE_DTYPES.items()},
      ('torch.storage', 'UntypedStorage'): _StorageType('UntypedStorage', np.uint8),
      **{('torch', n): _TorchDtype(n) for n in _TORCH_DTYPES},
  }


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only whitelisted names; storages become `_Storage` stand-ins."""

  def __init__(self, file, path: str, make_storage):
    super().__init__(file)
    self._path = path
    self._make_storage = make_storage
    self._allowed = _make_whitelist()

  def find_class(self, module, name):
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise _Unsafe(
          f'holds arbitrary pickled objects, not only tensors: it '
          f'refers to `{module}.{name}`, and finetune_jax never runs code from '
          f'a checkpoint. {_convert_hint(self._path)}') from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType) and _is_index_tuple(pid[4:5])
            and isinstance(pid[2], (str, int))
            and (len(pid) == 5 or pid[5] is None or (
                isinstance(pid[5], tuple) and len(pid[5]) == 3 and
                _is_index_tuple(pid[5][1:])))):
      raise _Corrupt(f'unexpected persistent id {pid!r:.200}.')
    _, storage_type, key, _location, numel, *view = pid
    return self._make_storage(str(key), storage_type.dtype, numel,
                              view[0] if view else None)


# ---------------------------------------------------------------- formats


def _from_bytes(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
  """A 1-D array of `dtype` from raw storage bytes of the given byte order."""
  if not big_endian or dtype.itemsize == 1:
    return np.frombuffer(raw, dtype=dtype)
  unit = dtype.itemsize // 2 if dtype.kind == 'c' else dtype.itemsize
  swapped = np.frombuffer(raw, dtype=f'>u{unit}').astype(f'<u{unit}')
  return swapped.view(dtype)


def _unpickle(data_pkl, path, make_storage):
  try:
    return _RestrictedUnpickler(data_pkl, path, make_storage).load()
  except (_Corrupt, _Unsafe):
    raise
  except Exception as e:  # pickle reports corruption in many ways
    raise _Corrupt(f'cannot parse the checkpoint pickle ({type(e).__name__}: {e}); '
                   'the file is truncated or corrupt.') from None


def _read_zip(path: str) -> Any:
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise _Corrupt(
        f'looks like a zip PyTorch checkpoint but cannot be opened ({e}); '
        f'the file is truncated or corrupt. Download or save it again.') from None
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise _Corrupt(
          f'a zip file but not a PyTorch checkpoint: expected one '
          f'`<name>/data.pkl`, found {pickles or "none"}.')
    prefix = pickles[0][:-len('data.pkl')]
    big_endian = False
    if prefix + 'byteorder' in names:
      big_endian = archive.read(prefix + 'byteorder').strip() == b'big'
    storages = {}

    def make_storage(key, dtype, numel, view):
      if view is not None:
        raise _Corrupt('storage views are not zip-format.')
      if key not in storages:
        storages[key] = _Storage(key, dtype, numel)
      return storages[key]

    obj = _unpickle(io.BytesIO(archive.read(pickles[0])), path, make_storage)
    for key, storage in storages.items():
      record = f'{prefix}data/{key}'
      try:
        raw = archive.read(record)
      except KeyError:
        raise _Corrupt(f'missing tensor data {record}.') from None
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise _Corrupt(f'cannot read {record} ({e}); the file is corrupt.') from None
      need = storage.numel * storage.dtype.itemsize
      if len(raw) < need:
        raise _Corrupt(f'{record} has {len(raw)} bytes, the pickle needs {need}; '
                       'the file is truncated or corrupt.')
      storage.fill(_from_bytes(raw[:need], storage.dtype, big_endian))
  return obj


def _read_legacy(path: str) -> Any:
  """The pre-1.6 format: magic, protocol, sys info, object, keys, storages."""
  with open(path, 'rb') as f:
    header = []
    for what in ('magic number', 'protocol version', 'system info'):
      try:
        header.append(_unpickle(f, path, None))
      except _Corrupt:
        raise _Corrupt(
            f'not a PyTorch checkpoint: cannot read its {what} '
            f'(expected a zip archive or the legacy pickle format). If it is a '
            f'very old tar-based torch file, re-save it with a recent torch.') from None
    magic, protocol, sys_info = header
    if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
      raise _Corrupt(
          'not a PyTorch checkpoint (bad magic number/protocol).')
    big_endian = not (isinstance(sys_info, dict) and sys_info.get('little_endian', True))
    storages = {}

    def make_storage(key, dtype, numel, view):
      if key not in storages:
        storages[key] = _Storage(key, dtype, numel)
      if view is None:
        return storages[key]
      view_key, offset, view_numel = view
      return _Storage(str(view_key), dtype, view_numel, (storages[key], offset))

    obj = _unpickle(f, path, make_storage)
    keys = _unpickle(f, path, None)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
      raise _Corrupt('bad storage key list.')
    for key in keys:
      if key not in storages:
        raise _Corrupt(f'data for unknown storage {key!r}.')
      storage = storages[key]
      count = f.read(8)
      if len(count) < 8:
        raise _Corrupt(
            f'truncated: the data of storage {key!r} is missing.')
      (numel,) = struct.unpack('>q' if big_endian else '<q', count)
      need = numel * storage.dtype.itemsize
      raw = f.read(need)
      if numel != storage.numel or len(raw) != need:
        raise _Corrupt(
            f'truncated or corrupt: storage {key!r} should hold '
            f'{storage.numel} elements ({storage.numel * storage.dtype.itemsize} '
            f'bytes), found {len(raw)} bytes.')
      storage.fill(_from_bytes(raw, storage.dtype, big_endian))
  return obj


def _materialise(obj, _open=None):
  """Replaces every pending tensor in a container tree by its numpy array."""
  if isinstance(obj, _PendingTensor):
    return obj.materialise()
  if not isinstance(obj, (dict, list, tuple)):
    return obj
  _open = set() if _open is None else _open
  key = id(obj)
  if key in _open:  # pickle memo references can build cycles
    raise _Corrupt('the checkpoint holds a container that contains itself.')
  _open.add(key)
  if isinstance(obj, dict):
    for k in list(obj):
      obj[k] = _materialise(obj[k], _open)
  else:
    obj = type(obj)(_materialise(v, _open) for v in obj)
  _open.discard(key)
  return obj


# ---------------------------------------------------------------- public


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
  """The object a `torch.save` file holds, with tensors as numpy arrays.

  Only dicts, lists, tuples, scalars, strings and tensors are accepted.
  Raises UnsafeCheckpointError for anything else (nothing in the file is
  executed) and CheckpointError for truncated or foreign files.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No checkpoint file at {path!r}.')
  with open(path, 'rb') as f:
    head = f.read(4)
  try:
    return _materialise(_read_zip(path) if head.startswith(b'PK') else _read_legacy(path))
  except _Unsafe as e:
    raise errors.UnsafeCheckpointError(path, str(e)) from None
  except _Corrupt as e:
    raise errors.CheckpointError(path, str(e)) from None


_WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'module')


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A flat `{name: np.ndarray}` from a PyTorch state-dict file.

  Nested dicts are joined with '.', like `module.state_dict()` keys. A
  training checkpoint `{'state_dict': {...}, 'epoch': 3, ...}` is unwrapped.
  """
  path = os.fspath(path)
  obj = read_torch_checkpoint(path)
  if isinstance(obj, dict):  # a training checkpoint: take the model's weights
    for key in _WRAPPER_KEYS:
      if isinstance(obj.get(key), dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict):
    raise errors.CheckpointError(
        path, f'holds a {type(obj).__name__}, not a state dict (a dict of tensors).')
  flat = {}

  def visit(prefix, tree):
    for k, v in tree.items():
      name = f'{prefix}{k}'
      if isinstance(v, dict):
        visit(name + '.', v)
      elif isinstance(v, np.ndarray):
        flat[name] = v
      else:
        raise errors.CheckpointError(
            path, f'a {type(v).__name__}, not a tensor; save `model.state_dict()` only.', key=name)

  visit('', obj)
  if not flat:
    raise errors.CheckpointError(path, 'holds no tensors.')
  return flat
