"""LP-FT (Kumar et al., 2022): a linear probe first, then fine-tuning from the probed head.

Fine-tuning a pretrained body under a randomly initialised head distorts the
features before the head is any good; probing first gives the body a head
worth following. `peft.method=lp_ft` trains what `peft.lp_ft.body` trains
(`full` by default, or any other method), but for the first
`peft.lp_ft.probe_steps` steps only the head does: that phase's step takes no
gradient for the body, and the body's learning rate is 0 until the probe ends
(then it warms up and decays over the remaining steps). One run, one optimizer
state, so it resumes on either side of the switch.
"""
from finetune_jax.peft import base
from finetune_jax.peft import method
from finetune_jax.peft import paths


class ProbeFirst(method.Method):
  """The body method's adaptation, trained with the head alone for `probe_steps` first.

  Everything else (merging, HF PEFT files, reserved positions) is the body's.
  """

  def __init__(self, body: method.Method, probe_steps: int):
    self.body, self.probe_steps = body, probe_steps
    self.name = body.name
    self.section, self.peft_types, self.mergeable = body.section, body.peft_types, body.mergeable

  def merged(self, adapted, params):
    return self.body.merged(adapted, params)

  def to_peft(self, model, adapted, params):
    return self.body.to_peft(model, adapted, params)

  def from_peft(self, adapted, model, path, cfg):
    return self.body.from_peft(adapted, model, path, cfg)

  def reserved_positions(self, adapted):
    return self.body.reserved_positions(adapted)

  def saved_options(self, adapted):
    return self.body.saved_options(adapted)

  def loads_shape(self, adapted, flat, path, shape):
    return self.body.loads_shape(adapted, flat, path, shape)


class LpFt(method.Method):
  name = 'lp_ft'
  section = 'lp_ft'

  @property
  def fields(self) -> tuple:
    # The body's own fields are part of the run too: any method's may be.
    others = {f for n in method.names() if n != self.name for f in method.get(n).fields}
    return ('lp_ft', *sorted(others))

  def applies(self, model) -> bool:
    """Where a linear probe does: the model has a new head."""
    return method.get('linear_probe').applies(model)

  def check(self, cfg) -> None:
    body = cfg.lp_ft.body
    if body in (self.name, 'linear_probe') or body not in method.names():
      raise ValueError(f'peft.lp_ft.body={body!r}: name the method the fine-tuning phase uses '
                       f'(full, partial, lora, ...; not lp_ft or linear_probe).')
    if cfg.lp_ft.probe_steps < 1:
      raise ValueError(f'peft.lp_ft.probe_steps={cfg.lp_ft.probe_steps} must be at least 1.')

  def adapt(self, model, cfg) -> base.Adapted:
    self.check(cfg)
    if not self.applies(model):
      raise base.not_applicable(model, self.name, 'a new classifier head to probe',
                                'Set --config.num_classes for a classification task.')
    names = list(paths.flatten(model.params))
    body = method.get(cfg.lp_ft.body)
    adapted = body.adapt(model, cfg)
    missing = [p for p in names if base.is_head(model, p)
               and p not in adapted.trainable]
    if missing:
      raise ValueError(f'peft.lp_ft.body={body.name!r} does not train the head ({missing[0]}), '
                       'so there is nothing to probe; choose a body method that trains it.')
    return base.Adapted(adapted.module, adapted.params, adapted.trainable,
                        ProbeFirst(body, cfg.lp_ft.probe_steps))


method.register(LpFt())
