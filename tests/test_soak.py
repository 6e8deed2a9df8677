"""The short soak: 200 steps with an eval, a checkpoint and a log every 20 leak no memory and no
file descriptors after the first 100 (experiments/soak.py; README, Reliability, has the
2000-step figure)."""
import json
import os
import subprocess
import sys

import pytest

from test_main import TINY

ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.mark.slow
def test_a_short_soak_holds_memory_and_descriptors_flat(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'experiments/soak.py', '--config=configs/default.py:smoke', '--steps=200',
       '--every=20', '--warmup=0.5', f'--workdir={tmp_path / "run"}',
       f'--out={tmp_path / "soak.json"}', *TINY],
      capture_output=True, text=True, cwd=ROOT, timeout=600,
      env={**os.environ, 'XLA_FLAGS': ''})
  assert proc.returncode in (0, 1), proc.stderr[-3000:]
  report = json.loads((tmp_path / 'soak.json').read_text())
  summary = report['summary']
  assert summary['samples_after_warmup'] >= 4, summary
  assert summary['fds_ok'], summary
  assert summary['rss_ok'], summary
  assert proc.returncode == 0
