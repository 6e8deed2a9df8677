"""What prompt and prefix tuning share: P learned positions before the input.

Prompt tuning prepends P learned vectors to the token embeddings; prefix
tuning prepends P learned keys and values to every attention layer. Neither
edits a model file: they drive the language models through two inputs that
transformers models have as well (and HF PEFT uses the same way):
`inputs_embeds`, and a key/value cache (`past_key_values`) whose first P
slots hold the prefix. Classes here wrap the base module and duck-type
linen's `apply`, like `intercept.Intercepted`; they are frozen dataclasses so
that `jax.jit(..., static_argnames='module')` can hash them.

A decoder's cached generation needs the P slots in its cache: `generate`
asks the module for one (`init_cache`) and passes it back on every call;
the wrapper then prepends P ones to the attention mask and shifts explicit
positions by P, so the text keeps the positions it had in training
(P, P + 1, ..., as in HF PEFT).
"""
import dataclasses
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import architecture
from finetune_jax.models import attention
from finetune_jax.models import host_init
from finetune_jax.peft import base
from finetune_jax.peft import hf_common
from finetune_jax.peft import method
from finetune_jax.peft import paths

def check_applicable(model, method: str) -> str:
  """The token-embedding table's param path (role `embed`), or the error for a
  model without one (a CNN, a ViT)."""
  arch = architecture.of(model)
  if not arch.has('embed'):
    raise base.not_applicable(
        model, method, 'a language model with token embeddings and attention '
        f'({"/".join(architecture.with_roles("embed"))})',
        'Choose another peft.method for it (lora, bitfit, partial, linear_probe, ...).')
  return embedding_path(model)


def embedding_path(model) -> str:
  """The param path of the token-embedding table: the `embed` module's 'embedding'."""
  regex = re.compile(architecture.of(model).roles['embed'])
  (path,) = [p for p in paths.flatten(model.params)
             if p.endswith('/embedding') and regex.search(p[:-len('/embedding')])]
  return path


def section_options(cfg, name: str, inits: tuple):
  """(the method's config section, num_virtual_tokens, init), both checked."""
  if name not in cfg:
    raise ValueError(f'The peft config has no `{name}` section; start the config '
                     'from base_config.get_config().')
  c = cfg[name]
  n = c.num_virtual_tokens
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ValueError(f'peft.{name}.num_virtual_tokens={n!r} must be a positive integer.')
  if c.init not in inits:
    raise ValueError(f'peft.{name}.init={c.init!r} must be one of {inits}.')
  return c, n, c.init


def cache_spec(config: dict) -> tuple[int, int, int]:
  """(layers, key/value heads, head dim) of a BERT, GPT-2 or Llama config."""
  heads = config['num_heads']
  return (config['num_layers'], config.get('num_kv_heads') or heads,
          config.get('head_dim') or config['hidden_size'] // heads)


def sample_token_ids(model, n: int, seed: int) -> np.ndarray:
  """n token ids drawn uniformly from the vocabulary (HF PEFT's SAMPLE_VOCAB init)."""
  vocab = model.config['vocab_size']
  return np.random.default_rng(seed).integers(0, vocab, n)


def empty_cache(spec, batch: int, slots: int, dtype) -> dict:
  layers, kv_heads, head_dim = spec
  return attention.init_cache(dict(num_layers=layers, num_kv_heads=kv_heads,
                                   head_dim=head_dim), batch, slots, dtype)


def with_ones(mask, batch: int, length: int, n: int):
  """[B, n + length]: n ones (the virtual positions) before `mask` (None: all ones)."""
  if mask is None:
    mask = jnp.ones((batch, length), jnp.int32)
  mask = jnp.asarray(mask)
  return jnp.concatenate([jnp.ones((batch, n), mask.dtype), mask], axis=1)


def batch_size(input_ids, inputs_embeds=None) -> int:
  return int(np.shape(input_ids if inputs_embeds is None else inputs_embeds)[0])


@dataclasses.dataclass(frozen=True)
class VirtualTokens:
  """`base` run with `num_virtual_tokens` learned positions before its input.

  Subclasses hold their params under the top-level key `key` and define
  `init_cache` (decoders' generation; prefix tuning's every call) and
  `_call` (a call without a cache).
  """
  base: nn.Module
  num_virtual_tokens: int
  key: str  # top-level param key of the method's own params
  spec: tuple  # cache_spec of the model
  embedding: str  # param path of the token-embedding table
  decoder: bool  # per-token outputs (cut to the input's length) and cached generation

  def split(self, params) -> tuple:
    """(the method's params, the base model's params)."""
    params = dict(params)
    own = params.pop(self.key)
    return own, params

  def apply(self, variables, input_ids=None, attention_mask=None, token_type_ids=None, *,
            positions=None, cache=None, **kwargs):
    own, params = self.split(variables['params'])
    variables = {**variables, 'params': params}
    if token_type_ids is not None:
      kwargs['token_type_ids'] = token_type_ids
    if cache is None:
      return self._call(own, variables, input_ids, attention_mask, positions, kwargs)
    # Generation: `cache` came from init_cache, its first P slots filled.
    n, batch = self.num_virtual_tokens, batch_size(input_ids, kwargs.get('inputs_embeds'))
    if attention_mask is not None:
      attention_mask = with_ones(attention_mask, batch, 0, n)
    if positions is not None:
      kwargs['positions'] = jnp.asarray(positions) + n
    return self.base.apply(variables, input_ids, attention_mask, cache=cache, **kwargs)

  @property
  def reserved_positions(self) -> int:
    """The context positions the method takes before the input."""
    return self.num_virtual_tokens

  def init_cache(self, params, batch: int, max_length: int) -> dict:
    raise NotImplementedError

  def _call(self, own, variables, input_ids, attention_mask, positions, kwargs):
    raise NotImplementedError

  def __getattr__(self, name):
    # Attributes such as `num_classes` read through to the base module.
    if name.startswith('__') or name in ('base', 'num_virtual_tokens', 'key', 'spec',
                                         'embedding', 'decoder'):
      raise AttributeError(name)
    return getattr(self.base, name)


def leaf_rng(path: str) -> np.random.Generator:
  """The draw for a new param: fixed per path, so runs agree (as lora.SEED)."""
  return host_init.leaf_rng(0, path)


# ------------------------------------------------------------------ the methods
# HF PEFT's prompt learning adapts no module: its one tensor is
# 'prompt_embeddings', with no prefix; a head is 'base_model.<name>' (PEFT
# wraps the transformers model directly). Each method says what its rows are.

PROMPT_KEY = 'prompt_embeddings'  # prompt learning's one tensor in PEFT's file
PROMPT_HEAD_PREFIX = 'base_model.'  # its modules_to_save keys: no tuner model in between


class VirtualTokensMethod(method.Method):
  """What prompt and prefix tuning share as methods; subclasses define `adapt`,
  `peft_rows` (rows and config fields), `peft_widths` and `params_from_rows`."""

  def applies(self, model) -> bool:
    return architecture.of(model).has('embed')

  def check(self, cfg) -> None:
    self.options(cfg)

  def merged(self, adapted, params) -> dict:
    raise ValueError(
        f'peft.method={self.name!r} learns positions ahead of the input, which no weight of '
        'the model can hold: there is no merged model to write. Export it with --format peft '
        '(HF PEFT, for peft.PeftModel.from_pretrained) or --format adapter.')

  def to_peft(self, model, adapted, params):
    module = adapted.module
    rows, config = self.peft_rows(model, module, params)
    config.update(num_virtual_tokens=module.num_virtual_tokens, num_transformer_submodules=1,
                  num_layers=module.spec[0], peft_type=self.peft_types[0])
    return {PROMPT_KEY: rows}, config, PROMPT_HEAD_PREFIX

  def from_peft(self, adapted, model, path, cfg):
    """An HF PEFT prompt/prefix dir: base model (widths, layers, heads), method,
    number of virtual tokens, then the tensor and the head."""
    tensors = dict(hf_common.read_weights(path, hf_common.PEFT_WEIGHTS))
    if PROMPT_KEY not in tensors:
      raise ValueError(f'{path}: its {hf_common.PEFT_WEIGHTS} holds no {PROMPT_KEY} tensor, '
                       f'which {cfg["peft_type"]} adapters keep their values in.')
    rows = np.asarray(tensors.pop(PROMPT_KEY))
    self._check_base(path, cfg, model, rows)
    if adapted.method is not self:
      raise ValueError(f'{path} holds a {self.name.replace("_", "-")} adapter; set '
                       f'--config.peft.method={self.name} to load it with peft.init_from.')
    module, n = adapted.module, len(rows)
    if cfg.get('num_virtual_tokens') not in (None, n):
      raise ValueError(f'{path}: its config says num_virtual_tokens='
                       f'{cfg["num_virtual_tokens"]} but its {PROMPT_KEY} holds {n} rows; '
                       'the adapter dir is inconsistent.')
    if n != module.num_virtual_tokens:
      raise hf_common.differs(path, f'has num_virtual_tokens={n}',
                              f'uses {module.num_virtual_tokens} '
                              f'(peft.{self.name}.num_virtual_tokens)',
                              f'Set --config.peft.{self.name}.num_virtual_tokens={n} to match it.')
    flat = paths.flatten(adapted.params)
    new = self.params_from_rows(path, cfg, module, flat, rows)
    others = {_strip_peft_prefix(k): np.asarray(v) for k, v in tensors.items()}
    new.update(hf_common.head_from(path, model, flat, others))
    return hf_common.replaced(adapted, flat, new)

  def _check_base(self, path, cfg, model, rows) -> None:
    """The adapter's token_dim, num_layers and num_attention_heads (and its
    tensor's width) must be this model's, as PEFT would set them for it."""
    family = model.config.get('model')
    fix = hf_common.base_model_fix(cfg)
    if not architecture.of(model).has('embed'):
      raise hf_common.mismatch(
          path, f'token embeddings take its {cfg["peft_type"]} values',
          f'({family}) has no token embeddings: prompt and prefix tuning apply to '
          f'{"/".join(architecture.with_roles("embed"))}', fix)
    submodules = cfg.get('num_transformer_submodules') or 1
    if submodules != 1:
      raise hf_common.mismatch(path, f'num_transformer_submodules={submodules} '
                               '(an encoder-decoder)', f'({family}) is one stack of layers', fix)
    mine, width = self.peft_widths(model)
    theirs = {k: cfg.get(k) for k in mine}
    differs = any(theirs[k] not in (None, mine[k]) for k in mine)
    if differs or rows.ndim != 2 or rows.shape[-1] != width:
      show = lambda d: ', '.join(f'{k}={v}' for k, v in d.items())
      raise hf_common.mismatch(path, f'{show(theirs)} ({PROMPT_KEY} {rows.shape})',
                               f'({family}) has {show(mine)} (a {PROMPT_KEY} width of {width})',
                               fix)


def _strip_peft_prefix(key: str) -> str:
  for prefix in (hf_common.PEFT_PREFIX, PROMPT_HEAD_PREFIX):
    if key.startswith(prefix):
      return key[len(prefix):]
  return key
