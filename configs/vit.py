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

from finetune_jax import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base_config.get_config()  # Every field, documented.
  # Or an HF ViT dir or a vit_jax/big_vision .npz.
  c.pretrained = 'vit-ti16-random'
  c.dataset = 'mnist5k'
  c.num_classes = 10
  # A multiple of the patch size (16): 2x2 patches; the position embeddings are resized to it.
  c.image_size = 32
  # Random init: everything trains. With real weights: partial, num_frozen_blocks=3 (embedding, cls,
  # pos_embedding).
  c.peft.method = 'full'
  c.total_steps = 240
  # High, as for training from scratch; about 1e-4 for real pretrained weights.
  c.learning_rate = 1e-3
  c.warmup_steps = 20
  c.eval_every = 120
  c.checkpoint_every = 120
  c.log_every = 40
  return base_config.finish(c, arg)
