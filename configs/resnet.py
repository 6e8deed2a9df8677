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
  # Or your torchvision/timm .pth, an HF ResNet dir or a Keras ResNet50 .h5.
  c.pretrained = 'resnet18-random'
  # Its 1000 test images keep evaluation short on CPU.
  c.dataset = 'mnist5k'
  c.num_classes = 10
  # ResNet's stride 32 leaves 1x1 at the top.
  c.image_size = 32
  # Random init: everything trains.
  c.peft.method = 'full'
  # ~1.3 epochs of the 4000 training digits; ~3 minutes on 2 busy CPU cores.
  c.total_steps = 80
  # From scratch, so a from-scratch rate (1e-4 for pretrained weights).
  c.learning_rate = 1e-3
  c.head_learning_rate = 1e-3
  c.warmup_steps = 10
  c.eval_every = 40
  c.checkpoint_every = 80
  c.log_every = 10
  return base_config.finish(c, arg)
