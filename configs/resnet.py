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

from finetune_jax import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config.get_config()  # Every field, documented.
  c.pretrained = 'resnet18-random'  # An alias (README) or a checkpoint path: your torchvision/timm .pth, HF ResNet dir or Keras ResNet50 .weights.h5.
  c.dataset = 'mnist5k'  # An alias (README) or a TFDS name prepared in data_dir; 1000 test images keep evaluation short on CPU.
  c.num_classes = 10  # Size of the new head.
  c.image_size = 32  # Input resolution; images are resized (and cropped) to it on the host. ResNet's stride 32 leaves 1x1 at the top.
  c.peft.method = 'full'  # Random init: everything trains.
  c.total_steps = 80  # ~1.3 epochs of the 4000 training digits; sized for ~3 minutes on 2 busy CPU cores.
  c.learning_rate = 1e-3  # Body; from scratch, so a from-scratch rate (1e-4 for pretrained weights).
  c.head_learning_rate = 1e-3  # The new head. None: learning_rate.
  c.warmup_steps = 10
  c.eval_every = 40
  c.checkpoint_every = 80
  c.log_every = 10
  return base_config.finish(c, arg)
