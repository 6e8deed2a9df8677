"""Soak: a long CLI run with frequent evals and checkpoints must not leak memory or files,
and a stop signal must end it quickly with a checkpoint.

Runs `python -m finetune_jax.main` for `--steps` steps with eval, checkpoint and log cadences
of `--every`, and samples the run's resident memory (VmRSS) and its open file descriptors
each time metrics.jsonl gains a train event. After the first `--warmup` of the steps
(compiles, caches, the first checkpoint writes), resident memory must stay within
`--rss_tolerance` of its post-warm-up median and the descriptor count must stay flat.

  python experiments/soak.py --steps 2000 --every 50 --out soak.json
  python experiments/soak.py --config configs/default.py:smoke ... --steps 200   # (tests)
  python experiments/soak.py --steps 400 --stop_at 100

Resident memory is polled every 20 ms; each sample keeps the interval's floor and peak. A leak
raises the floor. The peak swings with what happens to be live when it is polled (an eval's
batch and XLA's scratch buffers), so the bound is on the floor and the peaks are reported.

`--stop_at N` sends the run SIGTERM once it has logged step N and reports how long it took to
save its checkpoint and exit, and the exit status (README, Reliability: within 10 s).

Prints one row per sample and a JSON summary; exits 1 if a bound is broken.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def sample(pid: int) -> tuple[int, int]:
  """(resident bytes, open file descriptors) of process `pid` (Linux /proc)."""
  with open(f'/proc/{pid}/status') as f:
    rss_kib = next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))
  return rss_kib * 1024, len(os.listdir(f'/proc/{pid}/fd'))


def train_steps_logged(path: str) -> list[int]:
  try:
    with open(path) as f:
      events = [json.loads(line) for line in f if line.endswith('\n')]
  except FileNotFoundError:
    return []
  return [e['step'] for e in events if e['split'] == 'train']


def soak(config: str, steps: int, every: int, workdir: str, flags: list[str],
         stop_at: int | None = None) -> tuple[list[dict], dict | None]:
  """Runs the CLI; one {'step', 'rss_bytes', 'fds'} sample per train event, and with
  `stop_at` what SIGTERM after that step did."""
  command = [sys.executable, '-m', 'finetune_jax.main', f'--config={config}',
             f'--workdir={workdir}', f'--config.total_steps={steps}',
             f'--config.eval_every={every}', f'--config.checkpoint_every={every}',
             f'--config.log_every={every}', *flags]
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=open(workdir + '.log', 'w'))
  samples, seen, stop, signalled = [], set(), None, None
  metrics = os.path.join(workdir, 'metrics.jsonl')
  low = high = None  # resident bytes polled since the last train event: its floor and peak
  while proc.poll() is None:
    try:
      rss, fds = sample(proc.pid)
    except (FileNotFoundError, ProcessLookupError, StopIteration):
      break  # the run has ended
    low, high = min(low or rss, rss), max(high or rss, rss)
    for step in train_steps_logged(metrics):
      if step not in seen:
        seen.add(step)
        samples.append({'step': step, 'rss_bytes': low, 'rss_peak_bytes': high, 'fds': fds})
        print(f'step {step:6d}  rss floor {low / 2**20:8.1f} MiB  peak {high / 2**20:8.1f} MiB'
              f'  fds {fds}', flush=True)
        low = high = None
        if stop_at is not None and step >= stop_at and signalled is None:
          proc.send_signal(signal.SIGTERM)
          signalled = time.monotonic()
        break
    time.sleep(0.02)
  proc.wait()
  if signalled is not None:
    with open(workdir + '.log') as f:
      resume_line = any('To resume, run the same command again' in line for line in f)
    saved = [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
    stop = {'signalled_after_step': stop_at, 'exit_status': proc.returncode,
            'seconds_to_exit': time.monotonic() - signalled, 'checkpoint_step': max(saved),
            'resume_line': resume_line}
  elif proc.returncode:
    raise SystemExit(f'the run failed (exit {proc.returncode}); see {workdir}.log')
  return samples, stop


def summarise(samples: list[dict], warmup_step: int, rss_tolerance: float) -> dict:
  after = [s for s in samples if s['step'] > warmup_step]
  if len(after) < 2:
    raise SystemExit(f'only {len(after)} samples after warm-up; run more steps.')
  rss = [s['rss_bytes'] for s in after]
  peaks = [s['rss_peak_bytes'] for s in after]
  fds = [s['fds'] for s in after]
  median = statistics.median(rss)
  spread = max(abs(r - median) for r in rss) / median
  return {'samples_after_warmup': len(after), 'warmup_step': warmup_step,
          'rss_floor_median_mib': median / 2**20, 'rss_floor_min_mib': min(rss) / 2**20,
          'rss_floor_max_mib': max(rss) / 2**20, 'rss_floor_max_deviation': spread,
          'rss_floor_first_last_mib': [rss[0] / 2**20, rss[-1] / 2**20],
          'rss_peak_min_mib': min(peaks) / 2**20, 'rss_peak_max_mib': max(peaks) / 2**20,
          'fds_min': min(fds), 'fds_max': max(fds),
          'rss_ok': spread <= rss_tolerance, 'fds_ok': min(fds) == max(fds)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--every', type=int, default=50)
  parser.add_argument('--warmup', type=float, default=0.1, help='fraction of the steps')
  parser.add_argument('--rss_tolerance', type=float, default=0.05)
  parser.add_argument('--workdir', default=None, help='default: a new temporary directory')
  parser.add_argument('--out', default=None, help='also write the samples and summary here')
  parser.add_argument('--stop_at', type=int, default=None,
                      help='send SIGTERM after this step and time the exit')
  args, flags = parser.parse_known_args()
  workdir = args.workdir or os.path.join(tempfile.mkdtemp(prefix='soak'), 'run')
  samples, stop = soak(args.config, args.steps, args.every, workdir, flags, args.stop_at)
  if stop:
    print(json.dumps(stop))
    ok = stop['exit_status'] == 128 + signal.SIGTERM and stop['seconds_to_exit'] <= 10
    summary = {'stop': stop, 'ok': ok}
  else:
    summary = summarise(samples, int(args.steps * args.warmup), args.rss_tolerance)
    ok = summary['rss_ok'] and summary['fds_ok']
    print(json.dumps(summary))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'command': sys.argv, 'samples': samples, 'summary': summary}, f, indent=1)
  sys.exit(0 if ok else 1)


if __name__ == '__main__':
  main()
