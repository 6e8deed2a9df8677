r"""The default run: EfficientNet-Lite0 (ImageNet) fine-tuned on Fashion-MNIST.

The seed's recipe on real assets: pretrained backbone, head replaced
(1000 -> 10, zero-initialised), the stem and blocks 0-7 frozen, BatchNorm in
inference mode, AdamW with a body learning rate about 10x below pre-training.

  python -m finetune_jax.main --config configs/default.py --workdir runs/default

Expected (2-core CPU): see README "Results"; `:smoke` runs a few steps.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds init, data order and dropout.

  # Model and data.
  c.pretrained = 'efficientnet-lite0'  # An alias (README) or a checkpoint path.
  c.dont_load = ()  # Regexes of pretrained params to leave at init ('^head/' is implied when num_classes differs).
  c.dataset = 'fashion_mnist'  # An alias (README) or a TFDS name prepared in data_dir.
  c.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.eval_split = 'test'  # Evaluated in full.
  c.task = 'image_classification'
  c.num_classes = 10  # Size of the new head.
  c.image_size = 64  # Input resolution; images are resized (and cropped) to it on the host.
  c.eval_crop_ratio = 1.0  # Eval: shorter side -> image_size / ratio, then the central square; 1.0: plain resize. 0.875 for photos.
  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = False  # Train: Inception crop (area in `scale`, aspect in `ratio`) resized to image_size; off: the eval geometry.
  c.augment.scale = (0.08, 1.0)  # Area fraction of the random crop.
  c.augment.ratio = (3 / 4, 4 / 3)  # Aspect (width / height) of the random crop.
  c.augment.flip = False  # Train: mirror left-right with probability 1/2.
  c.folder_on_bad_image = 'error'  # folder:<dir> datasets: a corrupt image stops the build ('error') or is left out with a warning ('skip').

  # Method: which params train.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = 'partial'  # full | linear_probe | bitfit | partial.
  c.peft.num_frozen_blocks = 9  # partial: freeze the first N of the model's blocks (stem, blocks_0..7).
  c.peft.freeze = ()  # partial: more regexes over param paths to freeze.

  # Optimisation.
  c.total_steps = 1400
  c.batch_size = 64  # Global; split over the devices.
  c.learning_rate = 3e-4  # Body; ImageNet pre-training peaked near 3e-3 per 64 images.
  c.head_learning_rate = 1e-3  # The new head learns from scratch, so faster. None: learning_rate.
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
  c.eval_batch_size = 256
  c.eval_every = 700
  c.checkpoint_every = 700
  c.max_to_keep = 2
  c.log_every = 50
  c.worker_count = 0  # grain worker processes for the input pipeline.

  if arg == 'smoke':
    c.total_steps = 6
    c.warmup_steps = 2
    c.eval_every = 3
    c.checkpoint_every = 3
    c.log_every = 2
  elif arg:
    raise ValueError(f'Unknown config argument {arg!r}; use smoke or nothing.')
  return c
