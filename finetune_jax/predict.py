"""A trained run's predictions on a user's own inputs.

  python -m finetune_jax.predict --workdir runs/<x> [--best] [--top_k 5] [--json] <inputs...>

- image classifiers: each input is an image file, or a folder of them; prints the
  top-k class names with their probabilities;
- text classifiers: each input is a text, or a file with one text per line;
- causal LMs: each input is a prompt; prints its continuation (`--generation.*`
  flags override the run's sampling settings).

The class names are the dataset's (a folder dataset's are its subfolder names).
The model is the run's, from its latest checkpoint, or its best one with --best
(a run trained with keep_best). `--json` prints one JSON object per input.
"""
import dataclasses
import json
import os

from absl import flags
import jax
import numpy as np

from finetune_jax import cli
from finetune_jax import data
from finetune_jax import export
from finetune_jax import pipelines
from finetune_jax import sampling
from finetune_jax import tasks
from finetune_jax.data import image_ops
from finetune_jax.data import text as text_data

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
BATCH = 32


def image_files(inputs: list[str]) -> list[str]:
  """The image files the inputs name (a folder's, sorted); each checked readable."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  files = []
  for item in inputs:
    if os.path.isdir(item):
      found = sorted(os.path.join(root, f) for root, _, names in os.walk(item) for f in names
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        raise ValueError(f'{item}: a folder with no image files ({", ".join(IMAGE_EXTENSIONS)}).')
      files += found
    elif os.path.isfile(item):
      files.append(item)
    else:
      raise ValueError(f'{item}: no such image file or folder. This run is an image classifier: '
                       'give image files or folders.')
  for path in files:
    try:
      with Image.open(path) as image:
        image.load()
    except Exception as e:  # PIL raises many types for a bad file
      raise ValueError(f'{path}: not a readable image ({type(e).__name__}: {e}).') from None
  return files


def texts(inputs: list[str]) -> list[str]:
  """Each input as a text, or a file's lines (one text each)."""
  out = []
  for item in inputs:
    if os.path.isfile(item):
      try:
        with open(item, encoding='utf-8') as f:
          lines = [line.rstrip('\n') for line in f if line.strip()]
      except UnicodeDecodeError:
        raise ValueError(f'{item}: not a UTF-8 text file (one text per line).') from None
      if not lines:
        raise ValueError(f'{item}: an empty file; give one text per line.')
      out += lines
    else:
      out.append(item)
  return out


def class_names(config) -> list[str]:
  split = data.load_split(config.dataset, 'train', data_dir=config.data_dir,
                          on_bad_image=config.folder_on_bad_image)
  names = split.class_names or [str(i) for i in range(config.num_classes)]
  return list(names)


def restore(workdir: str, config, best: bool):
  """(model, adapted, params, step) of the run's latest checkpoint, or its best one."""
  return export.restore(workdir, config, best=tasks.selection_metric(config.task) if best else None)


def top_k(probabilities: np.ndarray, names: list[str], k: int) -> list[dict]:
  order = np.argsort(-probabilities, kind='stable')[:k]
  return [{'class': names[i], 'probability': float(probabilities[i])} for i in order]


def classify_images(config, model, adapted, params, files: list[str]) -> np.ndarray:
  transform = image_ops.make_image_transform(config.image_size, train=False,
                                             crop_ratio=config.eval_crop_ratio)
  apply = jax.jit(lambda p, x: jax.nn.softmax(adapted.module.apply({'params': p}, x)['logits']))
  out = []
  for start in range(0, len(files), BATCH):
    images = []
    for path in files[start:start + BATCH]:
      with open(path, 'rb') as f:
        images.append(transform.map({'image': f.read()})['image'])
    batch = model.preprocess(np.stack(images), image_size=config.image_size)
    out.append(np.asarray(apply(params, batch)))
  return np.concatenate(out)


def classify_texts(config, model, adapted, params, items: list[str]) -> np.ndarray:
  tokenizer = model.tokenizer
  ids = [np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch(items)]
  split = text_data.TextSplit(
      source=[{'input_ids': i, 'label': 0} for i in ids], num_examples=len(ids),
      num_classes=config.num_classes, class_names=None,
      lengths=np.array([len(i) for i in ids], np.int32), has_prompt=False,
      keep_last=text_data.closing_specials(text_data.plain_tokenizer(tokenizer)),
      name='inputs', version_dir='')
  text = config.text
  batches = data.text_eval_batches(
      split, batch_size=BATCH, max_length=text.max_length, pad_id=pipelines.pad_id(model),
      buckets=tuple(text.buckets) or data.bucket_lengths(text.max_length))
  apply = jax.jit(lambda p, i, m: jax.nn.softmax(
      adapted.module.apply({'params': p}, i, m)['logits']))
  out = [np.asarray(apply(params, b['input_ids'], b['attention_mask']))[b['mask']]
         for b in batches]
  return np.concatenate(out)


def predict(workdir: str, inputs: list[str], *, best: bool = False, k: int = 5,
            generation: dict | None = None) -> list[dict]:
  """One result dict per input (per image of a folder, per line of a text file)."""
  config = export.read_config(workdir)
  if not inputs:
    raise ValueError('Give one or more inputs after the flags.')
  if config.task == 'image_classification':
    items = image_files(inputs)
  elif config.task == 'text_classification':
    items = texts(inputs)
  else:
    items = list(inputs)
  names = class_names(config) if config.task in tasks.CLASSIFICATION else None
  model, adapted, params, step = restore(workdir, config, best)
  if config.task == 'causal_lm':
    gen = {**config.generation.to_dict(), **{k_: v for k_, v in (generation or {}).items()
                                            if v is not None}}
    current = dataclasses.replace(model, module=adapted.module, params=params)
    outs = sampling.generate_text(
        current, items, max_new_tokens=gen['max_new_tokens'], temperature=gen['temperature'],
        top_k=gen['top_k'], top_p=gen['top_p'], rng=jax.random.PRNGKey(config.seed))
    return [{'prompt': p, 'continuation': c, 'step': step} for p, c in zip(items, outs)]
  if config.task == 'image_classification':
    probabilities = classify_images(config, model, adapted, params, items)
    key = 'image'
  else:
    probabilities = classify_texts(config, model, adapted, params, items)
    key = 'text'
  return [{key: item, 'predictions': top_k(p, names, k), 'step': step}
          for item, p in zip(items, probabilities)]


# ------------------------------------------------------------ the CLI

FLAGS = flags.FLAGS
GENERATION = {'max_new_tokens': int, 'temperature': float, 'top_k': int, 'top_p': float}


def main(argv):
  generation = {name: FLAGS[f'generation.{name}'].value for name in GENERATION}
  results = predict(FLAGS.workdir, argv[1:], best=FLAGS.best, k=FLAGS.top_k,
                    generation=generation)
  for result in results:
    if FLAGS.json:
      print(json.dumps(result))
    elif 'continuation' in result:
      print(f'{result["prompt"]}{result["continuation"]}')
    else:
      shown = ', '.join(f'{p["class"]} {p["probability"]:.3f}' for p in result['predictions'])
      label = result.get('image') or result['text']
      print(f'{label}: {shown}')


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'A finished run directory.')
  flags.DEFINE_bool('best', False, 'Use the best checkpoint (keep_best) instead of the latest.')
  flags.DEFINE_integer('top_k', 5, 'Classes shown per input (classifiers).')
  flags.DEFINE_bool('json', False, 'One JSON object per input.')
  flags.DEFINE_integer('generation.max_new_tokens', None, 'Causal LMs; default: the run\'s.')
  flags.DEFINE_float('generation.temperature', None, 'Causal LMs; 0 is greedy.')
  flags.DEFINE_integer('generation.top_k', None, 'Causal LMs: keep the k most likely tokens.')
  flags.DEFINE_float('generation.top_p', None, 'Causal LMs: nucleus mass.')
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
