"""Every field the trainer reads, with its default and what it means.

An experiment's config (configs/<name>.py) starts from `get_config()` and
sets only what makes it that experiment, as vit_jax's configs do with their
common base, so a new engine field is added and documented in one place.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds init, data order, augmentation and dropout.

  # Model and data.
  c.pretrained = config_dict.placeholder(str)  # An alias (README) or a checkpoint path.
  c.dont_load = ()  # Regexes of pretrained params to leave at init ('^head/' is implied when num_classes differs).
  c.dataset = config_dict.placeholder(str)  # An alias (README), folder:<dir>, or a TFDS name prepared in data_dir.
  c.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.eval_split = 'test'  # Evaluated in full.
  c.task = 'image_classification'  # image_classification | text_classification | causal_lm.
  c.num_classes = config_dict.placeholder(int)  # Size of the new head (classification tasks).
  c.image_size = config_dict.placeholder(int)  # Input resolution; None: the model's own.
  c.eval_crop_ratio = 1.0  # Eval: shorter side -> image_size / ratio, then the central square; 1.0: plain resize. 0.875 for photos.
  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = False  # Train: Inception crop (area in `scale`, aspect in `ratio`) resized to image_size; off: the eval geometry.
  c.augment.scale = (0.08, 1.0)  # Area fraction of the random crop.
  c.augment.ratio = (3 / 4, 4 / 3)  # Aspect (width / height) of the random crop.
  c.augment.flip = False  # Train: mirror left-right with probability 1/2.
  c.text = ml_collections.ConfigDict()
  c.text.max_length = 128  # Tokens per example (text_classification) or per packed row (causal_lm); at most the model's context.
  c.text.truncate = False  # A text longer than max_length: True cuts it (the count is logged), False stops the run with an error.
  c.text.buckets = ()  # text_classification: batches are padded to the smallest of these that fits; (): 32, 64, ... up to max_length.
  c.text.pooling = 'cls'  # text_classification head input: 'cls' (first token), 'mean' (over real tokens) or 'pooler' (BERT's tanh pooler).
  c.generation = ml_collections.ConfigDict()
  c.generation.prompts = ()  # causal_lm: continued at every eval and logged (samples.jsonl, TensorBoard).
  c.generation.max_new_tokens = 40
  c.generation.temperature = 0.0  # 0: greedy (reproducible); > 0 samples with the filters below.
  c.generation.top_k = 0  # Keep the k most likely tokens; 0: all.
  c.generation.top_p = 1.0  # Nucleus: keep the most likely tokens up to this mass; 1: all.
  c.folder_on_bad_image = 'error'  # folder:<dir> datasets: a corrupt image stops the build ('error') or is left out with a warning ('skip').

  # Method: which params train.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = 'full'  # full | linear_probe | bitfit | partial | lora | dora | ia3 | adapter | prompt_tuning | prefix_tuning.
  c.peft.num_frozen_blocks = 0  # partial: freeze the first N of the model's `blocks` (README).
  c.peft.freeze = ()  # partial: more regexes over param paths to freeze.
  c.peft.lora = ml_collections.ConfigDict()  # lora and dora.
  c.peft.lora.rank = 8  # r of each update A (in, r) B (r, out).
  c.peft.lora.alpha = 16.0  # The update is scaled by alpha / r (alpha / sqrt(r) with rslora).
  c.peft.lora.dropout = 0.0  # Dropout on the adapted layers' inputs, on the LoRA path only.
  c.peft.lora.targets = ()  # Regexes re.search-ed over module paths ('layer_0/attention/self/query'); (): the family's default (README).
  c.peft.lora.rslora = False  # rsLoRA: scale by alpha / sqrt(r), so higher ranks keep learning.
  c.peft.lora.init = 'kaiming'  # A's init: 'kaiming' (uniform, HF PEFT's default) or 'gaussian' (std 1/r); B starts at zero.
  c.peft.lora.rank_overrides = ()  # ((regex, rank), ...): the first pattern that matches a target sets its rank.
  c.peft.init_from = config_dict.placeholder(str)  # An adapter dir to start from: HF PEFT (adapter_config.json + adapter_model.safetensors) or `finetune_jax.export --format adapter`; its base model must match.
  c.peft.ia3 = ml_collections.ConfigDict()  # ia3: learned rescaling vectors, initialised to 1.
  c.peft.ia3.targets = ()  # Regexes over module paths whose outputs are scaled (keys, values); both (): the family default (README).
  c.peft.ia3.feedforward = ()  # Regexes over module paths whose inputs are scaled (the MLP down projection); () with targets set: none.
  c.peft.adapter = ml_collections.ConfigDict()  # adapter: residual bottlenecks y + up(gelu(down(y))), up initialised to 0.
  c.peft.adapter.kind = 'houlsby'  # 'houlsby': after the attention and the MLP output projections; 'pfeiffer': after the MLP's only.
  c.peft.adapter.size = 64  # The bottleneck width of each adapter.
  c.peft.adapter.targets = ()  # Regexes over module paths whose outputs get an adapter; (): the kind's placement for the family.
  c.peft.prompt_tuning = ml_collections.ConfigDict()  # prompt_tuning: learned vectors before the token embeddings (language models).
  c.peft.prompt_tuning.num_virtual_tokens = 20  # P; the text then has P fewer positions of the model's context.
  c.peft.prompt_tuning.init = 'vocab'  # 'vocab': embeddings of P random vocabulary tokens; 'text': of init_text's tokens; 'random': N(0, table std^2).
  c.peft.prompt_tuning.init_text = ''  # With init='text': repeated or cut to P tokens.
  c.peft.prefix_tuning = ml_collections.ConfigDict()  # prefix_tuning: learned keys and values before every attention layer's own.
  c.peft.prefix_tuning.num_virtual_tokens = 20  # P key/value slots per layer; the text then has P fewer positions.
  c.peft.prefix_tuning.init = 'vocab'  # 'vocab': the model's own keys/values for P random tokens; 'random': N(0, 1) as HF PEFT.
  c.peft.prefix_tuning.projection_size = 0  # 0: train the prefixes directly; > 0: through an MLP of this width (HF prefix_projection).
  c.peft.learning_rate = config_dict.placeholder(float)  # The rate of the params a method adds (LoRA, adapters, IA3, prompts, prefixes); None: head_learning_rate, else learning_rate.

  # Optimisation.
  c.total_steps = 1000
  c.batch_size = 64  # Global; split over the devices.
  c.learning_rate = 1e-4  # Body; about 10x below pre-training for pretrained weights.
  c.head_learning_rate = config_dict.placeholder(float)  # The new head's own rate. None: learning_rate.
  c.warmup_steps = 50
  c.schedule = 'cosine'  # cosine | linear | constant decay after warmup.
  c.grad_clip_norm = 1.0  # Global-norm clipping; 0 turns it off.
  c.label_smoothing = 0.0
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'  # adamw | sgd.
  c.optimizer.b1 = 0.9  # adamw.
  c.optimizer.b2 = 0.999  # adamw.
  c.optimizer.eps = 1e-8  # adamw.
  c.optimizer.weight_decay = 1e-4  # Decoupled; kernels only, never frozen params.
  c.optimizer.momentum = 0.9  # sgd.
  c.optimizer.nesterov = True  # sgd.

  # Execution and bookkeeping.
  c.parallel = 'pmap'  # pmap: data parallel over all local devices; jit: one program over a mesh.
  c.eval_batch_size = 256  # Global; split over the devices.
  c.eval_every = 500  # Steps between evaluations on the full eval split (and one at the end).
  c.eval_before_training = False  # Also evaluate the starting model (step 0); results.json reports it as 'initial'.
  c.checkpoint_every = 500  # Steps between checkpoints (and one at the end).
  c.max_to_keep = 2  # Checkpoints kept.
  c.log_every = 50  # Steps between train-metric events.
  c.worker_count = 0  # grain worker processes for the input pipeline.
  return c


def finish(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the config argument: `smoke` shrinks a run to a few steps."""
  if arg == 'smoke':
    c.total_steps = 6
    c.warmup_steps = 2
    c.eval_every = 3
    c.checkpoint_every = 3
    c.log_every = 2
  elif arg:
    raise ValueError(f'Unknown config argument {arg!r}; use smoke or nothing.')
  return c
