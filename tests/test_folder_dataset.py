"""Tests of user image folders as datasets (`dataset='folder:<dir>'`).

Folders of real PNG/JPEG/... files are written with Pillow in tmp dirs.
"""

import collections
import io
import json
import logging
import os

import numpy as np
from PIL import Image
import pytest

from finetune_jax import data
from finetune_jax.data import builders
from finetune_jax.data import folder as folder_lib

CLASSES = ('cat', 'dog', 'zebra')
# Mixed formats and case, like a real photo dump.
SUFFIXES = ('.png', '.jpg', '.JPEG', '.bmp', '.gif', '.webp', '.PNG')


def write_image(path, value, size=(12, 16), gray=False):
  """A flat image of brightness `value` (lossless formats keep it exactly)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  shape = size if gray else size + (3,)
  image = Image.fromarray(np.full(shape, value, np.uint8))
  image.save(path)


def write_hashed_layout(root, per_class=10):
  """<root>/<class>/<i><suffix>; a PNG's value encodes its class."""
  paths = []
  for label, name in enumerate(CLASSES):
    for i in range(per_class):
      path = os.path.join(root, name, f'{i:03d}{SUFFIXES[i % len(SUFFIXES)]}')
      write_image(path, 40 * label + 20, gray=(i % 4 == 0))
      paths.append(os.path.relpath(path, root))
  return paths


def load(root, split, data_dir, **kwargs):
  return data.load_split(f'folder:{root}', split, str(data_dir), **kwargs)


def decoded(split, image_size=8):
  transform = data.make_image_transform(image_size, train=False,
                                        crop_ratio=1.0)
  batches = list(data.eval_batches(split, batch_size=8, transform=transform))
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  return images, labels


def info_mtime(data_dir, root):
  name = folder_lib.dataset_name(str(root))
  return os.path.getmtime(
      os.path.join(data_dir, name, folder_lib.VERSION, 'dataset_info.json'))


# ----------------------------------------------------------------- layouts


def test_hashed_layout_classes_and_split(tmp_path):
  root = tmp_path / 'My Photos'
  paths = write_hashed_layout(root)
  (root / 'cat' / '.hidden.jpg').write_bytes(b'not even an image')
  (root / 'cat' / 'notes.txt').write_text('ignored')
  train = load(root, 'train', tmp_path / 'tfds')
  test = load(root, 'test', tmp_path / 'tfds')
  assert train.class_names == list(CLASSES) and train.num_classes == 3
  is_test = [builders.is_test_text(p.replace(os.sep, '/')) for p in paths]
  assert test.num_examples == sum(is_test) > 0
  assert train.num_examples == len(paths) - sum(is_test)
  # Labels follow the class folders (gray or not, every format decodes).
  for split in (train, test):
    images, labels = decoded(split)
    assert images.shape[1:] == (8, 8, 3)
    np.testing.assert_allclose(images[:, 4, 4, 0], 40 * labels + 20, atol=3)
  example = train.source[0]
  assert isinstance(example['image'], bytes)
  assert (example['height'], example['width']) == (12, 16)


def test_split_is_deterministic_across_builds(tmp_path):
  root = tmp_path / 'pets'
  write_hashed_layout(root)

  def contents(data_dir):
    return {s: collections.Counter(ex['image'] for ex in load(
        root, s, data_dir).source) for s in ('train', 'test')}

  assert contents(tmp_path / 'a') == contents(tmp_path / 'b')


def test_explicit_layout_with_val(tmp_path):
  root = tmp_path / 'flowers'
  for label, name in enumerate(('rose', 'tulip')):
    for i in range(3):
      write_image(root / 'train' / name / f'{i}.png', 100 * label + 10)
  write_image(root / 'val' / 'tulip' / '0.png', 110)  # rose has no val image
  train = load(root, 'train', tmp_path / 'tfds')
  assert train.class_names == ['rose', 'tulip'] and train.num_examples == 6
  # 'val', 'validation' and the trainer's default 'test' all read val/.
  for name in ('val', 'validation', 'test', 'test[:1]'):
    split = load(root, name, tmp_path / 'tfds')
    images, labels = decoded(split)
    assert labels.tolist() == [1] and images[0, 0, 0, 0] == 110
  with pytest.raises(ValueError, match="no split 'extra'"):
    load(root, 'extra', tmp_path / 'tfds')


def test_explicit_layout_with_test_and_val(tmp_path):
  root = tmp_path / 'both'
  for split_dir in ('train', 'test', 'validation'):
    write_image(root / split_dir / 'a' / '0.png', 1)
    write_image(root / split_dir / 'a' / '1.png', 2)
  assert load(root, 'test', tmp_path / 'd').num_examples == 2
  assert load(root, 'val', tmp_path / 'd').num_examples == 2
  assert load(root, 'train', tmp_path / 'd').num_examples == 2


def test_resolve_split_aliases():
  resolve = folder_lib.resolve_split
  assert resolve('test', ['train', 'validation']) == 'validation'
  assert resolve('val[:50%]', ['train', 'test']) == 'test[:50%]'
  assert resolve('train+val', ['train', 'validation']) == 'train+validation'
  assert resolve('val', ['train', 'test', 'validation']) == 'validation'
  assert resolve('test', ['train']) == 'test'  # left for the split check


def test_dataset_name_is_sanitised_and_per_path(tmp_path):
  name = folder_lib.dataset_name(str(tmp_path / 'My Pets!  (2024)'))
  assert name.startswith('folder_my_pets_2024_') and len(name) == 28
  assert name == folder_lib.dataset_name(str(tmp_path / 'x' / '..' /
                                             'My Pets!  (2024)'))
  assert name != folder_lib.dataset_name(str(tmp_path / 'other' /
                                             'My Pets!  (2024)'))
  assert folder_lib.dataset_name('/').startswith('folder_images_')


# ---------------------------------------------------------------- rebuild


def test_rebuilds_only_when_the_folder_changes(tmp_path):
  root, data_dir = tmp_path / 'pets', str(tmp_path / 'tfds')
  write_hashed_layout(root, per_class=4)
  total = lambda: sum(load(root, s, data_dir).num_examples
                      for s in ('train', 'test'))
  assert total() == 12
  built = info_mtime(data_dir, root)
  assert total() == 12 and info_mtime(data_dir, root) == built  # cached

  write_image(root / 'dog' / 'new.png', 60)
  assert total() == 13
  os.remove(root / 'cat' / '000.png')
  assert total() == 12
  # Same files, new content (size or mtime changes): rebuilt too.
  rebuilt = info_mtime(data_dir, root)
  write_image(root / 'zebra' / '001.jpg', 0, size=(30, 30))
  load(root, 'train', data_dir)
  assert info_mtime(data_dir, root) != rebuilt


def test_prepare_builds_folders_too(tmp_path):
  root = tmp_path / 'pets'
  write_hashed_layout(root, per_class=3)
  seconds = data.prepare([f'folder:{root}'], data_dir=str(tmp_path / 'd'))
  assert list(seconds) == [f'folder:{root}']
  assert load(root, 'train', tmp_path / 'd').class_names == list(CLASSES)


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize('make,match', [
    (lambda root: None, 'does not exist'),
    (lambda root: root.mkdir(), 'is empty'),
    (lambda root: write_image(root / 'loose.png', 1),
     'has no class subfolders'),
    (lambda root: (write_image(root / 'cat' / '0.png', 1),
                   (root / 'dog').mkdir(), (root / 'emu').mkdir()),
     'class folders with no images .*: dog, emu'),
    (lambda root: write_image(root / 'train' / 'cat' / '0.png', 1),
     'has train/ but no test/, val/ or validation/'),
    (lambda root: (write_image(root / 'train' / 'cat' / '0.png', 1),
                   write_image(root / 'test' / 'dog' / '0.png', 1)),
     'test/ has class folders that train/ lacks: dog'),
    (lambda root: (write_image(root / 'train' / 'cat' / '0.png', 1),
                   write_image(root / 'val' / 'cat' / '0.png', 1),
                   write_image(root / 'validation' / 'cat' / '0.png', 1)),
     'both val/ and validation/'),
])
def test_bad_folders_fail_with_one_clear_message(tmp_path, make, match):
  root = tmp_path / 'user_images'
  make(root)
  with pytest.raises(ValueError, match=match) as error:
    load(root, 'train', tmp_path / 'tfds')
  assert str(root) in str(error.value)
  assert not (tmp_path / 'tfds').exists() or not any(
      n.startswith('folder_') for n in os.listdir(tmp_path / 'tfds'))


def test_too_few_images_for_the_hashed_split(tmp_path):
  root = tmp_path / 'one'
  write_image(root / 'a' / 'x.png', 1)  # sha256('a/x.png') sends it to train
  with pytest.raises(ValueError, match=(
      r"put none of its 1 usable images in 'test'(.|\n)*<dir>/train/")):
    load(root, 'train', tmp_path / 'tfds')


def write_bad_images(root):
  (root / 'cat' / 'empty.jpg').write_bytes(b'')
  (root / 'dog' / 'text.png').write_text('I am not a PNG')
  buffer = io.BytesIO()
  Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(buffer, 'JPEG')
  (root / 'zebra' / 'truncated.jpg').write_bytes(buffer.getvalue()[:300])


def test_corrupt_images_are_named(tmp_path):
  root = tmp_path / 'pets'
  write_hashed_layout(root, per_class=3)
  write_bad_images(root)
  with pytest.raises(ValueError) as error:
    load(root, 'train', tmp_path / 'tfds')
  message = str(error.value)
  for expected in (str(root), '3 unreadable or corrupt',
                   'cat/empty.jpg', 'dog/text.png', 'zebra/truncated.jpg',
                   "on_bad_image='skip'", 'config.folder_on_bad_image'):
    assert expected in message


def test_skip_leaves_bad_images_out_with_a_warning(tmp_path, caplog):
  root, data_dir = tmp_path / 'pets', tmp_path / 'tfds'
  write_hashed_layout(root, per_class=3)
  write_bad_images(root)
  with caplog.at_level(logging.WARNING):
    sizes = [load(root, s, data_dir, on_bad_image='skip').num_examples
             for s in ('train', 'test')]
  assert sum(sizes) == 9
  assert 'zebra/truncated.jpg' in caplog.text and '3 unreadable' in caplog.text
  # The build is reused; asking for 'error' still names the files it lacks.
  built = info_mtime(data_dir, root)
  with pytest.raises(ValueError, match='dog/text.png'):
    load(root, 'train', data_dir)
  assert info_mtime(data_dir, root) == built
  with pytest.raises(ValueError, match="on_bad_image='ignore'"):
    load(root, 'train', data_dir, on_bad_image='ignore')


def test_skipping_every_image_of_a_class_is_an_error(tmp_path):
  root = tmp_path / 'pets'
  write_image(root / 'cat' / '0.png', 1)
  (root / 'dog').mkdir()
  (root / 'dog' / 'broken.png').write_bytes(b'\x89PNG broken')
  with pytest.raises(ValueError, match='these classes have no images: dog'):
    load(root, 'train', tmp_path / 'tfds', on_bad_image='skip')


def test_source_record_describes_the_build(tmp_path):
  root, data_dir = tmp_path / 'pets', tmp_path / 'tfds'
  write_hashed_layout(root, per_class=2)
  load(root, 'train', data_dir)
  name = folder_lib.dataset_name(str(root))
  with open(data_dir / name / folder_lib.VERSION /
            folder_lib.SOURCE_FILE) as f:
    record = json.load(f)
  assert record['folder'] == str(root) and record['layout'] == 'hash_split'
  assert record['class_names'] == list(CLASSES) and record['skipped'] == []
  assert sum(record['splits'].values()) == 6
  assert name in data.prepared_datasets(str(data_dir))
