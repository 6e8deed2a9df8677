"""The methods that only choose which pretrained params train.

  full           every parameter trains
  linear_probe   only the new head trains; the backbone is a fixed feature map
  bitfit         bias terms and the head train (Ben Zaken et al., 2021)
  partial        the first `peft.num_frozen_blocks` of the model's ordered `blocks`
                 (for EfficientNet-Lite: stem, blocks_0, blocks_1, ...) are frozen,
                 and so is every param a `peft.freeze` regex matches; the rest trains

Their params stay the plain model's, so a merged export is the params as they
are; there is no adapter for the HF PEFT format to hold.
"""
from finetune_jax.peft import base
from finetune_jax.peft import method
from finetune_jax.peft import paths


class Freezing(method.Method):
  """A method that adds nothing: it splits the pretrained params."""
  mergeable = True

  def __init__(self, name: str, trains, fields: tuple = ()):
    self.name, self._trains = name, trains  # trains(model, cfg) -> (path -> bool)
    self._fields = fields

  @property
  def fields(self) -> tuple:
    return self._fields

  def adapt(self, model, cfg) -> base.Adapted:
    return base.freeze_all_but(model, self._trains(model, cfg))

  def merged(self, adapted, params) -> dict:
    return params

  def to_peft(self, model, adapted, params):
    raise ValueError(f'peft.method={self.name!r} trains no adapter, so there is nothing for '
                     'the PEFT format to hold. Export it with --format merged.')


def frozen_paths(model, cfg) -> set:
  """The param paths `partial` freezes."""
  names = list(paths.flatten(model.params))
  n = cfg.num_frozen_blocks
  if not 0 <= n <= len(model.blocks):
    raise ValueError(
        f'peft.num_frozen_blocks={n} is out of range: the model has '
        f'{len(model.blocks)} blocks {list(model.blocks)}; use 0..{len(model.blocks)}.')
  # A block is a top-level key: a subtree ('stem/conv/kernel') or a single
  # array ('pos_embedding').
  blocks = set(model.blocks[:n])
  frozen = {p for p in names if p.split('/', 1)[0] in blocks}
  frozen |= paths.match(cfg.freeze, names, what='peft.freeze')
  return frozen


# Each: (model, peft config) -> whether the param at a path trains.
def _everything(model, cfg):
  return lambda path: True


def _head(model, cfg):
  return lambda path: base.is_head(model, path)


def _head_and_biases(model, cfg):
  return lambda path: base.is_head(model, path) or path.endswith('/bias')


def _unfrozen(model, cfg):
  frozen = frozen_paths(model, cfg)
  return lambda path: path not in frozen


method.register(Freezing('full', _everything))
method.register(Freezing('linear_probe', _head))
method.register(Freezing('bitfit', _head_and_biases))
method.register(Freezing('partial', _unfrozen, fields=('num_frozen_blocks', 'freeze')))
