"""transformers BERT checkpoints <-> our BERT param tree (see models/bert/model.py).

Reads BertModel, BertForSequenceClassification and sentence-transformers dirs
(all-MiniLM-L6-v2 keeps its keys without the 'bert.' prefix):
  embeddings.{word,position,token_type}_embeddings.weight -> embeddings/<same>/embedding
  embeddings.LayerNorm                                     -> embeddings/LayerNorm
  encoder.layer.{i}.<module>                               -> layer_{i}/<module>
  pooler.dense                                             -> pooler/dense
  classifier                                               -> head
nn.Linear weights (out, in) become Dense kernels (in, out); LayerNorm
weight/bias become scale/bias. Every other key is an error, except buffers
(`embeddings.position_ids`, `embeddings.token_type_ids`: constants, not
weights) and the pre-training heads of BertForPreTraining / BertForMaskedLM
(`cls.predictions.*`, `cls.seq_relationship.*`), which an encoder does not use
(as transformers drops them when it loads a BertModel from such a file).
"""
import numpy as np
from flax import traverse_util

from finetune_jax.formats import mapping
from finetune_jax.models.bert import model as bert

# (HF module, our module, layout); '{i}' is the layer index.
_MODULES = (
    ('embeddings.word_embeddings', 'embeddings/word_embeddings', 'embed'),
    ('embeddings.position_embeddings', 'embeddings/position_embeddings', 'embed'),
    ('embeddings.token_type_embeddings', 'embeddings/token_type_embeddings', 'embed'),
    ('embeddings.LayerNorm', 'embeddings/LayerNorm', 'norm'),
    ('encoder.layer.{i}.attention.self.query', 'layer_{i}/attention/self/query', 'linear'),
    ('encoder.layer.{i}.attention.self.key', 'layer_{i}/attention/self/key', 'linear'),
    ('encoder.layer.{i}.attention.self.value', 'layer_{i}/attention/self/value', 'linear'),
    ('encoder.layer.{i}.attention.output.dense', 'layer_{i}/attention/output/dense', 'linear'),
    ('encoder.layer.{i}.attention.output.LayerNorm', 'layer_{i}/attention/output/LayerNorm',
     'norm'),
    ('encoder.layer.{i}.intermediate.dense', 'layer_{i}/intermediate/dense', 'linear'),
    ('encoder.layer.{i}.output.dense', 'layer_{i}/output/dense', 'linear'),
    ('encoder.layer.{i}.output.LayerNorm', 'layer_{i}/output/LayerNorm', 'norm'),
    ('pooler.dense', 'pooler/dense', 'linear'),
    ('classifier', 'head', 'linear'),
)
_LEAVES = {
    'embed': {'weight': 'embedding'},
    'linear': {'weight': 'kernel', 'bias': 'bias'},
    'norm': {'weight': 'scale', 'bias': 'bias'},
}
_BUFFERS = ('embeddings.position_ids', 'embeddings.token_type_ids')
_PRETRAINING_HEADS = ('cls.predictions.', 'cls.seq_relationship.')
PREFIX = 'bert.'
_TEMPLATES = mapping.Templates(_MODULES, _LEAVES)


def hf_to_params(tensors: dict[str, np.ndarray], source: str = '<HF checkpoint>') -> dict:
  """Our flat {path: array} from the tensors of a transformers BERT checkpoint."""
  params = mapping.ParamCollector(
      source, 'BERT', 'Is this a transformers BertModel / BertForSequenceClassification '
      'checkpoint (absolute position embeddings, no adapters)?',
      mixed='keys with and without the "bert." prefix are mixed')
  for key, value in tensors.items():
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if name in _BUFFERS or key.startswith(_PRETRAINING_HEADS):
      continue
    mapped = _TEMPLATES.match(name)
    if mapped is None:
      params.unmapped(key)
      continue
    ours, layout, leaf = mapped
    if layout == 'linear' and leaf == 'weight':
      value = params.transposed(key, value)
    params.add(ours, key, value)
  return params.result()


def hf_name(path: str, prefix: str = PREFIX) -> str:
  """The transformers state-dict name of our param `path` ('head/kernel' -> 'classifier.weight').

  prefix: 'bert.' as in BertForSequenceClassification; '' for a BertModel.
  """
  found = _TEMPLATES.theirs(path)
  if found is None:
    raise ValueError(f'Parameter {path!r} has no transformers name.')
  name = found[0]
  return name if name.startswith('classifier.') else prefix + name


def params_to_hf(params: dict, prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """transformers state-dict names and layouts of our params (see `hf_name`)."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params), sep='/').items():
    value = np.asarray(value)
    out[hf_name(path, prefix)] = np.ascontiguousarray(value.T if path.endswith('/kernel') else value)
  return out


def hf_architecture(hf_config: dict, source: str = '<config.json>') -> dict:
  """bert.make_config fields from a transformers BertConfig dict."""
  def get(key):
    if key not in hf_config:
      raise ValueError(f'{source}: config.json lacks {key!r}; is this a BERT config?')
    return hf_config[key]

  position = hf_config.get('position_embedding_type', 'absolute')
  if position != 'absolute':
    raise ValueError(f'{source}: position_embedding_type={position!r}; only absolute '
                     'position embeddings are supported.')
  act = hf_config.get('hidden_act', 'gelu')
  if act not in bert.ACTIVATIONS:
    raise ValueError(f'{source}: hidden_act={act!r} is not supported; use one of '
                     f'{sorted(bert.ACTIVATIONS)}.')
  if hf_config.get('is_decoder') or hf_config.get('add_cross_attention'):
    raise ValueError(f'{source} is a BERT decoder (is_decoder / add_cross_attention); '
                     'only encoders are supported.')
  return dict(
      vocab_size=get('vocab_size'), hidden_size=get('hidden_size'),
      num_layers=get('num_hidden_layers'), num_heads=get('num_attention_heads'),
      intermediate_size=get('intermediate_size'),
      max_position_embeddings=hf_config.get('max_position_embeddings', 512),
      type_vocab_size=hf_config.get('type_vocab_size', 2),
      layer_norm_eps=hf_config.get('layer_norm_eps', 1e-12), hidden_act=act,
      hidden_dropout_prob=hf_config.get('hidden_dropout_prob', 0.1),
      attention_probs_dropout_prob=hf_config.get('attention_probs_dropout_prob', 0.1),
      classifier_dropout=hf_config.get('classifier_dropout'),
      pad_token_id=hf_config.get('pad_token_id', 0))


def num_classes_in(flat: dict) -> int:
  """Classifier size of the checkpoint; 0 when it has no classifier."""
  kernel = flat.get('head/kernel')
  return 0 if kernel is None else int(kernel.shape[-1])


def hf_config(config: dict) -> dict:
  """A transformers config.json for our BERT config (the inverse of hf_architecture).

  With a head it describes a BertForSequenceClassification, else a BertModel.
  `pooling` has no HF field: a BertForSequenceClassification always feeds its
  classifier the pooler output (our pooling='pooler').
  """
  classes = config['num_classes']
  out = {
      'architectures': ['BertForSequenceClassification' if classes else 'BertModel'],
      'model_type': 'bert', 'vocab_size': config['vocab_size'],
      'hidden_size': config['hidden_size'], 'num_hidden_layers': config['num_layers'],
      'num_attention_heads': config['num_heads'],
      'intermediate_size': config['intermediate_size'], 'hidden_act': config['hidden_act'],
      'hidden_dropout_prob': config['hidden_dropout_prob'],
      'attention_probs_dropout_prob': config['attention_probs_dropout_prob'],
      'classifier_dropout': config['classifier_dropout'],
      'max_position_embeddings': config['max_position_embeddings'],
      'type_vocab_size': config['type_vocab_size'], 'layer_norm_eps': config['layer_norm_eps'],
      'pad_token_id': config['pad_token_id'], 'position_embedding_type': 'absolute',
      'initializer_range': 0.02}
  if classes:
    out.update(mapping.hf_labels(classes))
  return out


def export_warning(config: dict, has_head: bool) -> str | None:
  """Why transformers' logits will differ from ours, or None."""
  if has_head and config.get('pooling') != 'pooler':
    return (f"This BERT's head reads pooling={config.get('pooling')!r} features, but "
            "transformers' BertForSequenceClassification feeds its classifier the pooler "
            'output: its logits will differ from ours (hidden states match). Train with '
            '--config.text.pooling=pooler for identical logits.')
  return None
