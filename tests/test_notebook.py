"""experiments/colab.ipynb: stored without outputs, and run end to end with SMOKE = True."""
import os

import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', 'experiments', 'colab.ipynb')


def test_the_notebook_is_stored_clean_with_a_parameters_cell():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code)
  imports = next(i for i, c in enumerate(code) if 'import jax' in c.source)
  parameters = code[imports + 1]
  assert parameters.metadata.get('tags') == ['parameters']
  assert 'SMOKE = False' in parameters.source


@pytest.mark.slow
def test_the_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
  import papermill  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv('XLA_FLAGS', '')  # the kernel sees this machine's devices, not the suite's 8
  out = tmp_path / 'out.ipynb'
  papermill.execute_notebook(NOTEBOOK, str(out), parameters={'SMOKE': True,
                                                             'WORKDIR': str(tmp_path / 'runs')},
                             cwd=str(tmp_path), kernel_name='python3', progress_bar=False)
  nb = nbformat.read(str(out), as_version=4)
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  markdown = ''.join(o.data.get('text/markdown', '') for o in outputs if 'data' in o)
  assert 'devices:' in text and '"val_accuracy"' in text and '"eval_accuracy"' in text
  assert '[sweep] done peft.method=linear_probe' in text and '[sweep] done peft.method=bitfit' in text
  assert '| linear_probe |' in markdown and '| bitfit |' in markdown
  assert 'Selected on validation' in markdown
  # The learning curve, the sweep's cost/quality plot and the predictions.
  assert sum('image/png' in o.get('data', {}) for o in outputs) >= 3
  assert text.count('.png -> ') == 6
  assert (tmp_path / 'runs' / 'partial' / 'results.json').exists()
