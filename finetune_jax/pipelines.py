"""From a dataset and a model to the batches a task trains on, one class per task.

`open_dataset(config)` runs first and cheaply: it checks that the dataset is
prepared and has the config's classes, before any model is loaded. After the
model is loaded, `make(config, dataset, model)` gives a `Pipeline`: the train
stream (batch k a pure function of (seed, k), so a resumed run sees what an
uninterrupted one would), one eval pass, and `inputs`, which turns a batch
into the model's positional arguments inside the compiled step.
"""
import dataclasses
import functools
import logging
from typing import Callable, Iterator

import numpy as np

from finetune_jax import data
from finetune_jax import errors


@dataclasses.dataclass
class Pipeline:
  train: Callable[[int], Iterator[dict]]  # start_step -> infinite global batches
  eval: Callable[[], Iterator[dict]]  # one padded pass with a 'mask'
  inputs: Callable[[dict], tuple]  # batch -> model args, traced in the step
  describe: str = ''
  # One pass over the validation examples held out of train, where there are any.
  validation: Callable[[], Iterator[dict]] | None = None
  # config.extra_evals: {name: one pass over that split}.
  extra: dict = dataclasses.field(default_factory=dict)


def open_dataset(config) -> dict:
  """The raw train and eval splits; fails before any expensive work."""
  load = functools.partial(data.load_split, data_dir=config.data_dir,
                           on_bad_image=config.folder_on_bad_image)
  splits = {'train': load(config.dataset, 'train'),
            'eval': load(config.dataset, config.eval_split)}
  for name, dataset, split in extra_evals(config):  # checked now, before any model loads
    extra = load(dataset, split)
    if config.task in ('image_classification', 'text_classification') and (
        extra.num_classes != config.num_classes):
      raise ValueError(f'extra_evals {name!r}: {dataset}[{split}] has {extra.num_classes} '
                       f'classes, the run {config.num_classes}; evaluate on a dataset with '
                       'the same labels.')
    if config.task == 'image_classification':
      splits[f'extra:{name}'] = extra
  if config.task == 'image_classification':  # text splits are carved once tokenized
    splits.update(carve(config, splits['train']))
  classes = splits['train'].num_classes
  _check_fields(config, splits['train'])
  if config.task != 'causal_lm' and classes is not None and classes != config.num_classes:
    raise ValueError(f'num_classes={config.num_classes} but dataset {config.dataset!r} '
                     f'has {classes} classes; set --config.num_classes.')
  return splits


def _check_fields(config, train) -> None:
  """The field the task reads is there, in the type it reads."""
  if not train.num_examples:
    raise errors.DataError(f'Dataset {config.dataset!r} has no training examples.')
  field = 'image' if config.task == 'image_classification' else 'text'
  example = train.source[0]
  if field not in example:
    raise errors.DataError(
        f'Dataset {config.dataset!r} has no {field!r} field (it has {sorted(example)}), which '
        f'task={config.task} reads; choose a dataset of {field}s or another task.')
  if field == 'text' and not isinstance(example['text'], (str, bytes)):
    raise errors.DataError(
        f'Dataset {config.dataset!r}: its text field holds {type(example["text"]).__name__}, '
        'not text; store strings.')


def extra_evals(config) -> list[tuple[str, str, str]]:
  """config.extra_evals as (name, dataset, split) triples, checked."""
  out = []
  for item in config.get('extra_evals', ()):
    if len(item) != 3 or not all(isinstance(x, str) and x for x in item):
      raise ValueError(f'extra_evals item {item!r}: give (name, dataset, split), e.g. '
                       "('rotate', 'fashion_mnist_shifted', 'rotate').")
    if item[0] in ('train', 'eval', 'val') or not item[0].isidentifier():
      raise ValueError(f'extra_evals name {item[0]!r}: use an identifier other than train, '
                       'eval and val (it prefixes the metrics).')
    out.append(tuple(item))
  names = [n for n, _, _ in out]
  if len(set(names)) < len(names):
    raise ValueError(f'extra_evals names {names} repeat; give each eval its own name.')
  return out


def carve(config, train) -> dict:
  """{'train': what trains, 'val': the held-out examples (where any)}: config's
  validation_examples and train_examples, picked by the seed."""
  train, val = data.carve(train, validation=config.validation_examples,
                          train_examples=config.train_examples, seed=config.seed,
                          stratify=config.task != 'causal_lm', name=f'{config.dataset}[train]')
  if config.validation_examples or config.train_examples:
    logging.info('%s[train]: %d examples train, %d validate.', config.dataset,
                 train.num_examples, 0 if val is None else val.num_examples)
  return {'train': train, **({'val': val} if val is not None else {})}


def extra_splits(splits: dict) -> dict:
  """{name: split} of the `extra:<name>` roles that open_dataset put in `splits`."""
  return {role.split(':', 1)[1]: split for role, split in splits.items()
          if role.startswith('extra:')}


def eval_passes(one_pass, eval_split, val_split=None, extras=None) -> dict:
  """A Pipeline's eval, validation and extra fields: `one_pass(split)` for each split there
  is, where one_pass gives a callable that makes one padded pass over the split."""
  return {'eval': one_pass(eval_split),
          'validation': None if val_split is None else one_pass(val_split),
          'extra': {name: one_pass(split) for name, split in (extras or {}).items()}}


def make(config, splits: dict, model, reserved_positions: int = 0) -> Pipeline:
  """reserved_positions: context positions the PEFT method puts before the text
  (prompt and prefix tuning), which the text cannot use."""
  if config.task == 'image_classification':
    return _images(config, splits, model)
  return _text(config, model, reserved_positions)


# ------------------------------------------------------------------ images


def make_image_transforms(config):
  """(train, eval) per-example image transforms, run in the grain workers.

  They decode, crop and resize to config.image_size on the host, so the device
  gets uint8 squares (the model's preprocess then only normalises).
  """
  shared = dict(crop_ratio=config.eval_crop_ratio, to_rgb=True)
  augment = config.augment
  train_transform = data.make_image_transform(
      config.image_size, train=True,
      random_resized_crop=augment.random_resized_crop, flip=augment.flip,
      scale=tuple(augment.scale), ratio=tuple(augment.ratio), **shared)
  eval_transform = data.make_image_transform(config.image_size, train=False,
                                             **shared)
  return train_transform, eval_transform


def needs_host_transform(split, config) -> bool:
  """Whether images must be decoded, cropped or augmented on the host.

  Stored arrays of one size with no augmentation and a plain resize go to the
  device as they are (fewer bytes to copy) and `preprocess` resizes them there.
  """
  image = split.source[0]['image']
  fixed_array = isinstance(image, np.ndarray) and image.dtype == np.uint8
  augmented = config.augment.random_resized_crop or config.augment.flip
  return not fixed_array or augmented or config.eval_crop_ratio != 1.0


def _images(config, splits, model) -> Pipeline:
  train_transform = eval_transform = None
  if needs_host_transform(splits['train'], config):
    train_transform, eval_transform = make_image_transforms(config)
  preprocess = functools.partial(model.preprocess, image_size=config.image_size)
  return Pipeline(
      train=lambda start_step: data.train_batches(
          splits['train'], batch_size=config.batch_size, seed=config.seed,
          start_step=start_step, transform=train_transform,
          worker_count=config.worker_count, per_process=True),
      inputs=lambda batch: (preprocess(batch['image']),),
      **eval_passes(lambda split: functools.partial(
          data.eval_batches, split, batch_size=config.eval_batch_size, transform=eval_transform,
          per_process=True), splits['eval'], splits.get('val'), extra_splits(splits)))


def _local(batches_fn, batch_size: int):
  """`batches_fn` yielding this process's rows of each global batch (data.local_rows)."""
  return lambda *args, **kwargs: data.local_rows(batches_fn(*args, **kwargs), batch_size)


# -------------------------------------------------------------------- text


def _token_id(tokenizer, *candidates):
  for token in candidates:
    if token is not None and tokenizer.token_to_id(token) is not None:
      return tokenizer.token_to_id(token)
  return None


def pad_id(model) -> int:
  """The token that pads a classifier's batches (masked out, so any id would do)."""
  pad = model.config.get('pad_token_id')
  pad = _token_id(model.tokenizer, '[PAD]', '<pad>') if pad is None else pad
  return 0 if pad is None else pad


def _text(config, model, reserved_positions: int) -> Pipeline:
  """Tokenized once into the data dir (per tokenizer), then bucketed or packed."""
  tokenizer = model.tokenizer
  if tokenizer is None:
    raise ValueError(f'Model {config.pretrained!r} has no tokenizer; task '
                     f'{config.task!r} needs one.')
  text = config.text
  context = model.config.get('max_position_embeddings')
  if context is not None and text.max_length + reserved_positions > context:
    taken = (f', of which peft.method={config.peft.method} takes {reserved_positions}'
             if reserved_positions else '')
    raise ValueError(f'text.max_length={text.max_length} exceeds the context of '
                     f'{config.pretrained!r} ({context} positions{taken}); set '
                     f'--config.text.max_length={context - reserved_positions} or less.')
  load = functools.partial(data.load_text_split, tokenizer=tokenizer,
                           data_dir=config.data_dir)
  train_split, eval_split = load(config.dataset, 'train'), load(config.dataset, config.eval_split)
  carved = carve(config, train_split)
  train_split, val_split = carved['train'], carved.get('val')
  extras = {name: load(dataset, split) for name, dataset, split in extra_evals(config)}
  inputs = lambda batch: (batch['input_ids'], batch['attention_mask'])
  if config.task == 'causal_lm':
    # Packing cuts the token stream into rows of max_length: a long document
    # continues in the next row, so no text is too long here.
    eos = model.config.get('eos_token_id')
    if eos is None:
      raise ValueError(f'{config.pretrained!r} names no eos_token_id; packing '
                       'needs one to separate documents.')
    pad = model.config.get('pad_token_id')
    pad = eos if pad is None else pad
    shared = dict(seq_len=text.max_length, eos_id=eos, pad_id=pad)
    return Pipeline(
        train=_local(lambda start_step: data.packed_lm_batches(
            train_split, batch_size=config.batch_size, seed=config.seed,
            start_step=start_step, **shared), config.batch_size),
        inputs=inputs, describe=f'packed rows of {text.max_length} tokens',
        **eval_passes(lambda split: _local(functools.partial(
            data.packed_lm_eval_batches, split, batch_size=config.eval_batch_size, **shared),
                                           config.eval_batch_size),
                      eval_split, val_split, extras))
  for name, split in (('train', train_split), (config.eval_split, eval_split)):
    truncated = data.check_lengths(split, text.max_length, text.truncate,
                                   what=f'{config.dataset}[{name}]')
    if truncated:
      logging.info('%s[%s]: %d of %d texts truncated to %d tokens (text.truncate).',
                   config.dataset, name, truncated, split.num_examples, text.max_length)
  pad = pad_id(model)
  buckets = tuple(text.buckets) or data.bucket_lengths(text.max_length)
  shared = dict(max_length=text.max_length, buckets=buckets, pad_id=pad)
  return Pipeline(
      train=_local(lambda start_step: data.text_batches(
          train_split, batch_size=config.batch_size, seed=config.seed,
          start_step=start_step, truncate=text.truncate, **shared), config.batch_size),
      inputs=inputs, describe=f'padded to buckets {list(buckets)}',
      **eval_passes(lambda split: _local(functools.partial(
          data.text_eval_batches, split, batch_size=config.eval_batch_size,
          sort_by_length=True, **shared), config.eval_batch_size),
                    eval_split, val_split, extras))
