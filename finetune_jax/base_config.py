"""Every field the trainer reads, with its default and what it means.

An experiment's config (configs/<name>.py) starts from `get_config()` and
sets only what makes it that experiment, as vit_jax's configs do with their
common base, so a new engine field is added and documented in one place.
"""
import ast
import difflib

import ml_collections
from ml_collections import config_dict

from finetune_jax import errors


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Seeds init, data order, augmentation and dropout.
  c.seed = 0

  # Model and data.
  # An alias (README) or a checkpoint path.
  c.pretrained = config_dict.placeholder(str)
  # Regexes of pretrained params to leave at init ('^head/' is implied when num_classes differs).
  c.dont_load = ()
  # An alias (README), folder:<dir>, or a TFDS name prepared in data_dir.
  c.dataset = config_dict.placeholder(str)
  # TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.data_dir = config_dict.placeholder(str)
  # Evaluated in full.
  c.eval_split = 'test'
  # Held out of train and evaluated beside eval_split as val_*, for choosing settings: a count, or
  # a fraction below 1; 0: none. Picked by the seed, stratified by class where there are classes.
  c.validation_examples = 0.0
  # More eval sets, each (name, dataset, split), evaluated at every eval and reported as
  # <name>_<metric>: e.g. (('rotate', 'fashion_mnist_shifted', 'rotate'),), or for a causal LM
  # (('austen', 'austen', 'test'),).
  c.extra_evals = ()
  # Classifiers: at the end, compare the head's input (the pooled features) of the starting and
  # the final model on the first N eval examples; results.json's feature_drift has their linear
  # CKA and mean cosine similarity. 0: skip.
  c.feature_drift_examples = 0
  # Train on a subset of what train keeps after validation (data-efficiency studies): a count, or a
  # fraction below 1; 0: all. Picked as validation is.
  c.train_examples = 0.0
  # image_classification | text_classification | causal_lm.
  c.task = 'image_classification'
  # Size of the new head (classification tasks).
  c.num_classes = config_dict.placeholder(int)
  # Input resolution; None: the model's own.
  c.image_size = config_dict.placeholder(int)
  # Eval: shorter side -> image_size / ratio, then the central square; 1.0: plain resize. 0.875 for
  # photos.
  c.eval_crop_ratio = 1.0
  c.augment = ml_collections.ConfigDict()
  # Train: Inception crop (area in `scale`, aspect in `ratio`) resized to image_size; off: the eval
  # geometry.
  c.augment.random_resized_crop = False
  # Area fraction of the random crop.
  c.augment.scale = (0.08, 1.0)
  # Aspect (width / height) of the random crop.
  c.augment.ratio = (3 / 4, 4 / 3)
  # Train: mirror left-right with probability 1/2.
  c.augment.flip = False
  c.text = ml_collections.ConfigDict()
  # Tokens per example (text_classification) or per packed row (causal_lm); at most the model's
  # context.
  c.text.max_length = 128
  # A text longer than max_length: True cuts it (the count is logged), False stops the run with an
  # error.
  c.text.truncate = False
  # text_classification: batches are padded to the smallest of these that fits; (): 32, 64, ... up
  # to max_length.
  c.text.buckets = ()
  # text_classification head input: 'cls' (first token), 'mean' (over real tokens) or 'pooler'
  # (BERT's tanh pooler).
  c.text.pooling = 'cls'
  c.generation = ml_collections.ConfigDict()
  # causal_lm: continued at every eval and logged (samples.jsonl, TensorBoard).
  c.generation.prompts = ()
  c.generation.max_new_tokens = 40
  # 0: greedy (reproducible); > 0 samples with the filters below.
  c.generation.temperature = 0.0
  # Keep the k most likely tokens; 0: all.
  c.generation.top_k = 0
  # Nucleus: keep the most likely tokens up to this mass; 1: all.
  c.generation.top_p = 1.0
  # folder:<dir> datasets: a corrupt image stops the build ('error') or is left out with a warning
  # ('skip').
  c.folder_on_bad_image = 'error'

  # Method: which params train.
  c.peft = ml_collections.ConfigDict()
  # full | linear_probe | bitfit | partial | lora | dora | ia3 | adapter | prompt_tuning |
  # prefix_tuning | lp_ft.
  c.peft.method = 'full'
  # partial: freeze the first N of the model's `blocks` (README).
  c.peft.num_frozen_blocks = 0
  # partial: more regexes over param paths to freeze.
  c.peft.freeze = ()
  # lora and dora.
  c.peft.lora = ml_collections.ConfigDict()
  # r of each update A (in, r) B (r, out).
  c.peft.lora.rank = 8
  # The update is scaled by alpha / r (alpha / sqrt(r) with rslora).
  c.peft.lora.alpha = 16.0
  # Dropout on the adapted layers' inputs, on the LoRA path only.
  c.peft.lora.dropout = 0.0
  # Layers to adapt: roles ('q', 'v', 'conv'; README), HF-style bare module names ('q_proj')
  # or regexes re.search-ed over module paths ('layer_0/attention/self/query'); (): roles q, v
  # on a transformer, conv on a CNN.
  c.peft.lora.targets = ()
  # rsLoRA: scale by alpha / sqrt(r), so higher ranks keep learning.
  c.peft.lora.rslora = False
  # A's init: 'kaiming' (uniform, HF PEFT's default) or 'gaussian' (std 1/r); B starts at zero.
  c.peft.lora.init = 'kaiming'
  # ((regex, rank), ...): the first pattern that matches a target sets its rank.
  c.peft.lora.rank_overrides = ()
  # An adapter dir to start from: HF PEFT (adapter_config.json + adapter_model.safetensors) or
  # `finetune_jax.export --format adapter`; its base model must match.
  c.peft.init_from = config_dict.placeholder(str)
  # ia3: learned rescaling vectors, initialised to 1.
  c.peft.ia3 = ml_collections.ConfigDict()
  # Layers whose outputs are scaled (roles, bare names or regexes, as lora.targets); both ():
  # roles k, v here and mlp_out in feedforward.
  c.peft.ia3.targets = ()
  # Layers whose inputs are scaled (the MLP down projection); () with targets set: none.
  c.peft.ia3.feedforward = ()
  # adapter: residual bottlenecks y + up(gelu(down(y))), up initialised to 0.
  c.peft.adapter = ml_collections.ConfigDict()
  # 'houlsby': after the attention and the MLP output projections; 'pfeiffer': after the MLP's only.
  c.peft.adapter.kind = 'houlsby'
  # The bottleneck width of each adapter.
  c.peft.adapter.size = 64
  # Layers whose outputs get an adapter (as lora.targets); (): the kind's roles.
  c.peft.adapter.targets = ()
  # prompt_tuning: learned vectors before the token embeddings (language models).
  c.peft.prompt_tuning = ml_collections.ConfigDict()
  # P; the text then has P fewer positions of the model's context.
  c.peft.prompt_tuning.num_virtual_tokens = 20
  # 'vocab': embeddings of P random vocabulary tokens; 'text': of init_text's tokens; 'random': N(0,
  # table std^2).
  c.peft.prompt_tuning.init = 'vocab'
  # With init='text': repeated or cut to P tokens.
  c.peft.prompt_tuning.init_text = ''
  # prefix_tuning: learned keys and values before every attention layer's own.
  c.peft.prefix_tuning = ml_collections.ConfigDict()
  # P key/value slots per layer; the text then has P fewer positions.
  c.peft.prefix_tuning.num_virtual_tokens = 20
  # 'vocab': the model's own keys/values for P random tokens; 'random': N(0, 1) as HF PEFT.
  c.peft.prefix_tuning.init = 'vocab'
  # 0: train the prefixes directly; > 0: through an MLP of this width (HF prefix_projection).
  c.peft.prefix_tuning.projection_size = 0
  # lp_ft (Kumar et al. 2022): the head alone trains for probe_steps, then everything `body` trains.
  c.peft.lp_ft = ml_collections.ConfigDict()
  # Steps of the linear probe; the body's learning rate warms up after them.
  c.peft.lp_ft.probe_steps = 100
  # The method of the fine-tuning phase: full, partial, bitfit, lora, ...
  c.peft.lp_ft.body = 'full'
  # The rate of the params a method adds (LoRA, adapters, IA3, prompts, prefixes); None:
  # head_learning_rate, else learning_rate.
  c.peft.learning_rate = config_dict.placeholder(float)
  # QLoRA: hold the frozen Dense kernels quantized (int8 | nf4), dequantized inside each matmul;
  # none keeps them float. Not with methods that train the base (full, bitfit, partial).
  c.peft.quantize_base = 'none'
  # Inputs per quantization block (one scale per block and output); 64 as QLoRA.
  c.peft.quantize_block = 64

  # Optimisation.
  c.total_steps = 1000
  # Global; split over the devices.
  c.batch_size = 64
  # Split each device's share of the batch into this many micro-batches, run in turn inside the
  # step with their gradients summed: the same update in less activation memory.
  c.grad_accum_steps = 1
  # Recompute activations in the backward pass instead of keeping them: none | block (each
  # transformer layer or CNN block keeps only its input) | a jax.checkpoint_policies name
  # (dots_saveable: each block keeps its matmul outputs). README, Memory.
  c.remat = 'none'
  # Body; about 10x below pre-training for pretrained weights.
  c.learning_rate = 1e-4
  # The new head's own rate. None: learning_rate.
  c.head_learning_rate = config_dict.placeholder(float)
  c.warmup_steps = 50
  # cosine | linear | constant decay after warmup.
  c.schedule = 'cosine'
  # Global-norm clipping; 0 turns it off.
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  c.optimizer = ml_collections.ConfigDict()
  # adamw | sgd.
  c.optimizer.name = 'adamw'
  # adamw.
  c.optimizer.b1 = 0.9
  # adamw.
  c.optimizer.b2 = 0.999
  # adamw.
  c.optimizer.eps = 1e-8
  # Decoupled; kernels only, never frozen params.
  c.optimizer.weight_decay = 1e-4
  # sgd.
  c.optimizer.momentum = 0.9
  # sgd.
  c.optimizer.nesterov = True

  # Execution and bookkeeping.
  # pmap: data parallel over all local devices; jit: one program over a mesh; fsdp: jit with
  # params, gradients and optimizer state sharded over the mesh's fsdp axis. README, Memory.
  c.parallel = 'pmap'
  c.mesh = ml_collections.ConfigDict()
  # fsdp's device mesh, data x fsdp = the devices; -1: the devices the other axis leaves.
  c.mesh.data = 1
  # The batch splits over both axes; params, gradients and optimizer state over this one.
  c.mesh.fsdp = -1
  # A run of several processes (README, Several hosts); TPU pods, SLURM and Open MPI are detected.
  c.distributed = ml_collections.ConfigDict()
  # host:port of process 0's coordinator ($JAX_COORDINATOR_ADDRESS).
  c.distributed.coordinator = ''
  # > 1: this run is one of that many processes ($JAX_NUM_PROCESSES).
  c.distributed.num_processes = 1
  # This process's index, 0 .. num_processes - 1 ($JAX_PROCESS_ID).
  c.distributed.process_id = 0
  # Seconds to wait for the other processes before a clear error.
  c.distributed.timeout_s = 300
  # Compute a frozen, deterministic bottom once per example and train the rest on its outputs,
  # kept under <data_dir>/feature_cache: auto (where exact) | on (also a random bottom, in
  # inference mode) | off. README, Speed.
  c.cache_frozen_features = 'auto'
  # The CLI keeps compiled programs here (JAX's persistent compilation cache), so a repeated run
  # or a sweep's next run skips most of its startup; '' turns it off.
  c.compilation_cache_dir = '~/.cache/finetune_jax/jax'
  # float32 | bfloat16 (compute in bf16; params, gradients, optimizer state in f32) | auto (bf16
  # on GPU/TPU, float32 on CPU, where XLA runs bf16 slower).
  c.precision = 'auto'
  # After a step with a non-finite loss or gradient (whose update is never applied): stop (an
  # error naming the step and parameter; the last checkpoint stays good) | skip (count it, go
  # on). README, Reliability.
  c.nonfinite = 'stop'
  # skip: this many non-finite steps in a row stop the run.
  c.nonfinite_max_skips = 10
  # Global; split over the devices.
  c.eval_batch_size = 256
  # Steps between evaluations on the full eval split (and one at the end).
  c.eval_every = 500
  # Also evaluate the starting model (step 0); results.json reports it as 'initial'.
  c.eval_before_training = False
  # Steps between checkpoints (and one at the end).
  c.checkpoint_every = 500
  # Checkpoints kept.
  c.max_to_keep = 2
  # Also keep the checkpoint of the eval with the best val_accuracy (val_loss for causal_lm; the
  # latest of equals) in
  # <workdir>/best_checkpoint/; results.json reports its step and metrics as `best`. Needs
  # validation_examples.
  c.keep_best = False
  # Steps between train-metric events.
  c.log_every = 50
  # grain worker processes for the input pipeline.
  c.worker_count = 0
  return c


def finish(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the config argument (`--config configs/x.py:ARG`), items split by commas.

  `smoke` shrinks a run to a few steps; `FIELD=VALUE` sets a field, named by its
  dotted path (`peft.lora.rank=4`) or by its last name where that is unique
  (`method=lora`). VALUE is a Python literal (4, 0.1, ('q', 'v'), None) or else a
  string. As big_vision's `parse_arg`: `configs/default.py:method=lora,smoke`.
  """
  for item in split_arg(arg):
    if item == 'smoke':
      c.total_steps = 6
      c.warmup_steps = 2
      c.eval_every = 3
      c.checkpoint_every = 3
      c.log_every = 2
    elif '=' in item:
      name, value = item.split('=', 1)
      set_field(c, field_path(c, name.strip()), literal(value.strip()))
    else:
      raise errors.ConfigError(
          'arg', f'Unknown config argument {item!r}; use smoke or FIELD=VALUE items, '
          'comma-separated (e.g. method=lora,smoke).')
  return c


def split_arg(arg: str | None) -> list[str]:
  """The comma-separated items of `arg`; commas inside brackets or quotes stay."""
  items, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(arg or ''):
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      items.append(arg[start:i])
      start = i + 1
  items.append((arg or '')[start:])
  return [item.strip() for item in items if item.strip()]


def field_path(c: ml_collections.ConfigDict, name: str) -> str:
  """The dotted path of a field given by its path or its unique last name."""
  leaves = _leaf_paths(c)
  if name in leaves:
    return name
  matches = [p for p in leaves if p.rsplit('.', 1)[-1] == name]
  if len(matches) == 1:
    return matches[0]
  if matches:
    raise errors.ConfigError(name, f'Config argument {name}=... is ambiguous: it may be '
                             f'{matches}; name the field by its dotted path.')
  close = difflib.get_close_matches(name, leaves + [p.rsplit('.', 1)[-1] for p in leaves], 5)
  raise errors.ConfigError(name, f'Unknown config argument field {name!r}; nearest '
                           f'fields: {close}.')


def _leaf_paths(c, prefix: str = '') -> list[str]:
  out = []
  for key in c.keys():
    value = c[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaf_paths(value, f'{prefix}{key}.')
    else:
      out.append(prefix + key)
  return out


def literal(text: str):
  """A Python literal's value (4, 0.1, ('q', 'v'), None), else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_field(c, path: str, value) -> None:
  """Sets the field at dotted `path`; a value of the wrong type is a ConfigError."""
  *parents, leaf = path.split('.')
  for part in parents:
    c = c[part]
  try:
    c[leaf] = value
  except TypeError as e:
    raise errors.ConfigError(path, f'Config argument {path}={value!r}: {e}') from None
