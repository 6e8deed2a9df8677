"""Which transformers module each of our modules is, per model family, both ways.

Names come from each family's own table (`HFLayout.name`, the one its
checkpoint export uses), so import and export read the same table. The
exception is ViT under transformers >= 5: its modules were renamed (q_proj,
mlp.fc1, ...) while its checkpoints kept the old names, and PEFT keys follow
the modules. Exports use the installed transformers'
naming (v5 without one); imports read both.
"""
from finetune_jax.models import architecture
from finetune_jax.peft import paths


def family(model) -> architecture.HFLayout:
  layout = architecture.of(model).hf
  if layout is None:
    covered = [a.name for a in architecture.all_architectures() if a.hf is not None]
    raise ValueError(f'Model family {model.config.get("model")!r} has no Hugging Face layout '
                     f'here; the HF formats cover {covered}. Use --format adapter (our '
                     'own layout) for this model.')
  return layout


def has_head(model) -> bool:
  return bool(model.config.get('num_classes'))


def prefix(model) -> str:
  return family(model).prefix[0 if has_head(model) else 1]


def _checkpoint_names(model, modules) -> dict:
  """{our module: transformers checkpoint module name}, from the family's name table."""
  fam, body = family(model), prefix(model)
  return {m: fam.name(f'{m}/kernel', model.config, body)[:-len('.weight')] for m in modules}


def module_names(model, modules) -> dict:
  """{our module path: the transformers module PEFT adapts}."""
  return {m: family(model).runtime_name(n) for m, n in _checkpoint_names(model, modules).items()}


def inverse_names(model) -> dict:
  """{HF module name, in every naming we read: our module}, the head included."""
  fam = family(model)
  modules = model_modules(model)
  checkpoint = _checkpoint_names(model, modules)
  prefixes = {p for p in fam.prefix if p}
  out = {}
  for m, name in checkpoint.items():
    renamed = fam.v5_name(name)
    for n in (name, renamed):  # adapters from either transformers generation
      core = next((n[len(p):] for p in prefixes if n.startswith(p)), n)
      for variant in (core, *(p + core for p in prefixes)):
        out.setdefault(variant, m)
  return out


def model_modules(model) -> list:
  """The pretrained model's modules with a kernel (not those a method added)."""
  return paths.candidate_modules(paths.flatten(model.params))


def extra_hf_modules(model) -> set:
  """Linear modules transformers builds that our params lack (randomly initialised there)."""
  return family(model).extra_modules(model.config, has_head(model))


def head_names(model, flat: dict) -> dict:
  """{HF name of a head tensor ('classifier.weight', ...): our path}; {} without a head."""
  if not has_head(model):
    return {}
  fam = family(model)
  return {fam.name(p, model.config, prefix(model)): p
          for p in flat if p.startswith(model.head + '/')}
