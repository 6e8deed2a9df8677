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
from finetune_jax import base_config
from finetune_jax.peft import base
from finetune_jax.peft import method
from finetune_jax.peft import paths


class Freezing(method.Method):
  """A method that adds nothing: it splits the pretrained params."""
  mergeable = True

  def __init__(self, name: str, trains, what: str, fields: tuple = ()):
    self.name, self._trains = name, trains  # trains(model, cfg) -> (path -> bool)
    self._what, self._fields = what, fields  # what: what it trains, for messages

  @property
  def fields(self) -> tuple:
    return self._fields

  def adapt(self, model, cfg) -> base.Adapted:
    adapted = base.freeze_all_but(model, self._trains(model, cfg))
    if not adapted.trainable and not self.applies(model):
      raise base.not_applicable(
          model, self.name, f'{self._what} to train',
          'Set --config.num_classes for a classification task (a new head trains), or '
          'choose another peft.method (lora, full, partial, ...).')
    return adapted

  def applies(self, model) -> bool:
    """Whether there is anything for it to train, with its defaults."""
    defaults = base_config.get_config().peft
    return bool(base.freeze_all_but(model, self._trains(model, defaults)).trainable)

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


method.register(Freezing('full', _everything, 'parameters'))
method.register(Freezing('linear_probe', _head, 'a new classifier head (num_classes)'))
method.register(Freezing('bitfit', _head_and_biases, 'bias terms or a new classifier head'))
method.register(Freezing('partial', _unfrozen, 'blocks left unfrozen',
                         fields=('num_frozen_blocks', 'freeze')))
