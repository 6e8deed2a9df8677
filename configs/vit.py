r"""A ViT-Ti/16 made for 224 px, fine-tuned on MNIST (5k) at 32 px.

The ViT recipe of vit_jax / big_vision: the head replaced (zero-initialised),
the position embeddings resampled bilinearly from the 14x14 patch grid of
224 px to the 2x2 grid of 32 px (the class token's embedding kept), AdamW,
warmup then cosine, gradient clipping at norm 1.

No pretrained ViT weights ship offline, so `pretrained` defaults to a random
Ti/16 and every parameter trains (`full`): the run checks the ViT path end to
end, it does not measure transfer. Point `pretrained` at real weights, a
transformers ViT dir (config.json + model.safetensors) or a vit_jax /
big_vision .npz (e.g. an augreg Ti_16-i21k-... file), and use
`--config.peft.method=partial` with a learning rate near 1e-4 for the seed's
recipe.

  python -m finetune_jax.main --config configs/vit.py --workdir runs/vit

Measured through this command (2 CPU cores, shared with other jobs): 0.907
test accuracy on the 1000 test images, 135 s `wall_s`, 2 m 19 s for the
command. `:smoke` runs a few steps.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds init, data order and dropout.

  # Model and data.
  c.pretrained = 'vit-ti16-random'  # An alias (README) or a checkpoint path: an HF ViT dir or a vit_jax/big_vision .npz.
  c.dont_load = ()  # Regexes of pretrained params to leave at init ('^head/' is implied when num_classes differs).
  c.dataset = 'mnist5k'  # An alias (README) or a TFDS name prepared in data_dir.
  c.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
  c.eval_split = 'test'  # Evaluated in full.
  c.task = 'image_classification'
  c.num_classes = 10  # Size of the new head.
  c.image_size = 32  # Input resolution, a multiple of the patch size (16): 2x2 patches; the position embeddings are resized to it.
  c.eval_crop_ratio = 1.0  # Eval: shorter side -> image_size / ratio, then the central square; 1.0: plain resize. 0.875 for photos.
  c.augment = ml_collections.ConfigDict()
  c.augment.random_resized_crop = False  # Train: Inception crop (area in `scale`, aspect in `ratio`) resized to image_size; off: the eval geometry.
  c.augment.scale = (0.08, 1.0)  # Area fraction of the random crop.
  c.augment.ratio = (3 / 4, 4 / 3)  # Aspect (width / height) of the random crop.
  c.augment.flip = False  # Train: mirror left-right with probability 1/2 (never for digits).
  c.folder_on_bad_image = 'error'  # folder:<dir> datasets: a corrupt image stops the build ('error') or is left out with a warning ('skip').

  # Method: which params train.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = 'full'  # full | linear_probe | bitfit | partial. Random init: everything trains.
  c.peft.num_frozen_blocks = 3  # partial: freeze the first N of the model's blocks (embedding, cls, pos_embedding, encoderblock_0..).
  c.peft.freeze = ()  # partial: more regexes over param paths to freeze.

  # Optimisation.
  c.total_steps = 240
  c.batch_size = 64  # Global; split over the devices.
  c.learning_rate = 1e-3  # Body; high, as for training from scratch; about 1e-4 for real pretrained weights.
  c.head_learning_rate = None  # The head's own learning rate. None: learning_rate.
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
  c.eval_every = 120
  c.checkpoint_every = 120
  c.max_to_keep = 2
  c.log_every = 40
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
