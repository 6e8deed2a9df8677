"""TF-IDF + logistic regression on a text-classification dataset: the baseline
a fine-tuned encoder has to beat.

Same data, same split as the trainer (`data.load_split`): fit on 'train',
score on the eval split with the metrics the trainer reports (accuracy and
macro-F1). Word uni- and bigrams, sublinear tf, and the regularisation C
picked by 5-fold cross-validation on the training split only.

Run:  .venv/bin/python experiments/tfidf_baseline.py [--dataset fortunes] [--out baseline.json]
"""
import argparse
import json
import time

import numpy as np
from sklearn import feature_extraction
from sklearn import linear_model
from sklearn import metrics
from sklearn import model_selection
from sklearn import pipeline

from finetune_jax import data


def texts_and_labels(split) -> tuple[list[str], np.ndarray]:
  examples = data.pipeline.read_examples(split.source, range(split.num_examples))
  texts = [e['text'].decode('utf-8') if isinstance(e['text'], bytes) else e['text']
           for e in examples]
  return texts, np.array([int(e['label']) for e in examples])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', default='fortunes')
  parser.add_argument('--eval_split', default='test')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--out', default=None, help='also write the results as JSON here')
  args = parser.parse_args()

  start = time.perf_counter()
  train_x, train_y = texts_and_labels(data.load_split(args.dataset, 'train', args.data_dir))
  test_x, test_y = texts_and_labels(data.load_split(args.dataset, args.eval_split, args.data_dir))
  model = pipeline.make_pipeline(
      feature_extraction.text.TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True,
                                              min_df=2),
      linear_model.LogisticRegression(max_iter=2000))
  search = model_selection.GridSearchCV(
      model, {'logisticregression__C': [1.0, 3.0, 10.0, 30.0]}, cv=5,
      scoring='accuracy', n_jobs=1)
  search.fit(train_x, train_y)
  predicted = search.predict(test_x)
  results = {
      'dataset': args.dataset, 'train_examples': len(train_x),
      'eval_examples': len(test_x), 'C': search.best_params_['logisticregression__C'],
      'eval_accuracy': metrics.accuracy_score(test_y, predicted),
      'eval_macro_f1': metrics.f1_score(test_y, predicted, average='macro'),
      'wall_s': time.perf_counter() - start,
  }
  print(json.dumps(results, indent=2))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
