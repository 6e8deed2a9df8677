r"""ResNet-18 (v1.5), every parameter trained, on MNIST-5k at 32 px.

No pretrained ResNet weights ship offline, so this trains `resnet18-random`
(torchvision's init; BN acts as a fixed affine, its statistics never
train) from scratch: a check of the architecture and the full
fine-tuning path on a small budget, not a transfer-learning result. With your
own weights set `pretrained` to a torchvision/timm `.pth` (or `.safetensors`),
an HF `ResNetForImageClassification` dir or a Keras ResNet50 `.weights.h5`;
their head is replaced (1000 -> 10, zero-initialised) and then a lower body
learning rate (1e-4) and `peft.method=partial` are the usual recipe.

  python -m finetune_jax.main --config configs/resnet.py --workdir runs/resnet

Measured (2 CPU cores shared with three other engineers' jobs, load ~4, so
times are noisy): test accuracy 0.944 on the 1000 test digits (0.823 at step
40), wall_s 122 (127 s for the command), 58 train img/s; the same run at
load ~6 took 181 s. `:smoke` (6 steps, 42 s) checks the wiring, not accuracy.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds init, data order and dropout.

  # Model and data.
  c.pretrained = 'resnet18-random'  # An alias (README) or a checkpoint path: your torchvision/timm .pth, HF ResNet dir or Keras ResNet50 .weights.h5.
  c.dont_load = ()  # Regexes of pretrained params to leave at init ('^head/' is implied when num_classes differs).
  c.dataset = 'mnist5k'  # An alias (README) or a TFDS name prepared in data_dir; 1000 test images keep evaluation short on CPU.
  c.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.eval_split = 'test'  # Evaluated in full.
  c.task = 'image_classification'
  c.num_classes = 10  # Size of the new head.
  c.image_size = 32  # Input resolution; images are resized (and cropped) to it on the host. ResNet's stride 32 leaves 1x1 at the top.
  c.eval_crop_ratio = 1.0  # Eval: shorter side -> image_size / ratio, then the central square; 1.0: plain resize. 0.875 for photos.
  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = False  # Train: Inception crop (area in `scale`, aspect in `ratio`) resized to image_size; off: the eval geometry.
  c.augment.scale = (0.08, 1.0)  # Area fraction of the random crop.
  c.augment.ratio = (3 / 4, 4 / 3)  # Aspect (width / height) of the random crop.
  c.augment.flip = False  # Train: mirror left-right with probability 1/2.
  c.folder_on_bad_image = 'error'  # folder:<dir> datasets: a corrupt image stops the build ('error') or is left out with a warning ('skip').

  # Method: which params train.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = 'full'  # full | linear_probe | bitfit | partial.
  c.peft.num_frozen_blocks = 0  # partial: freeze the first N of the model's blocks (stem, stage1_block1, stage1_block2, ...).
  c.peft.freeze = ()  # partial: more regexes over param paths to freeze.

  # Optimisation.
  c.total_steps = 80  # ~1.3 epochs of the 4000 training digits; sized for ~3 minutes on 2 busy CPU cores.
  c.batch_size = 64  # Global; split over the devices.
  c.learning_rate = 1e-3  # Body; from scratch, so a from-scratch rate (1e-4 for pretrained weights).
  c.head_learning_rate = 1e-3  # The new head. None: learning_rate.
  c.warmup_steps = 10
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
  c.eval_every = 40
  c.checkpoint_every = 80
  c.max_to_keep = 2
  c.log_every = 10
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
