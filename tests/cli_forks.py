"""Runs the real command-line entry points many times, cheaply: a server process imports the
heavy libraries once, then forks a child per invocation that runs the module as
`python -m <module> <args>` would (runpy, as `__main__`).

Each child also records every XLA compile (JAX's monitoring event), so a test can check
that an error came before any compile.

  with CliForks() as cli:
    result = cli.run('finetune_jax.main', ['--config=...', '--workdir=...'])
    result.code, result.stderr, result.compiled
    pid = cli.start(...); os.kill(pid, signal.SIGTERM); result = cli.wait(pid)
"""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(__file__), '..')


@dataclasses.dataclass
class Result:
  code: int
  stdout: str
  stderr: str
  compiled: list  # the names of the programs XLA compiled, in order


class CliForks:

  def __init__(self, env: dict | None = None):
    self._env = {**os.environ, **(env or {})}
    self._dir = tempfile.mkdtemp(prefix='cli_forks')
    self._server = None

  def __enter__(self):
    self._server = subprocess.Popen(
        [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=ROOT, env=self._env)
    assert self._server.stdout.readline().strip() == 'ready'
    return self

  def __exit__(self, *exc):
    self._server.stdin.close()
    self._server.wait(timeout=60)

  def run(self, module: str, argv: list[str], cwd: str = ROOT, env: dict | None = None
          ) -> Result:
    """Runs `python -m module *argv` to its end."""
    return self.wait(self.start(module, argv, cwd, env))

  def start(self, module: str, argv: list[str], cwd: str = ROOT, env: dict | None = None
            ) -> int:
    """Starts `python -m module *argv` (with `env` added to the environment); its pid."""
    self._server.stdin.write(json.dumps(
        {'module': module, 'argv': argv, 'cwd': cwd, 'env': env or {},
         **{name: os.path.join(self._dir, name) for name in ('out', 'err', 'report')}}) + '\n')
    self._server.stdin.flush()
    return int(self._server.stdout.readline())

  def wait(self, pid: int) -> Result:
    """The result of the run `start` began (its exit code: -N if signal N ended it)."""
    code = int(self._server.stdout.readline())
    files = [open(os.path.join(self._dir, name)) for name in ('out', 'err', 'report')]
    with files[0] as out, files[1] as err, files[2] as report:
      return Result(code, out.read(), err.read(), report.read().split())


def _child(case: dict) -> None:
  import runpy
  import jax
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, *args, fun_name='?', **kwargs: compiles.append(fun_name)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  for fd, name in ((1, 'out'), (2, 'err')):
    os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
  os.chdir(case['cwd'])
  os.environ.update(case['env'])
  sys.argv = [case['module'], *case['argv']]
  code = 0
  try:
    runpy.run_module(case['module'], run_name='__main__', alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # an uncaught error: as the interpreter would report it
    import traceback
    traceback.print_exc()
    code = 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    with open(case['report'], 'w') as f:
      f.write(' '.join(compiles))
  os._exit(code)


def _serve() -> None:
  # What every entry point imports, once; not the entry modules themselves, whose
  # top-level flag definitions must run in the child, as __main__.
  import finetune_jax.cli  # noqa: F401
  import finetune_jax.export  # noqa: F401
  import finetune_jax.predict  # noqa: F401
  import finetune_jax.train  # noqa: F401
  print('ready', flush=True)
  for line in sys.stdin:
    case = json.loads(line)
    for name in ('out', 'err', 'report'):  # a killed child leaves no stale report
      open(case[name], 'w').close()
    pid = os.fork()
    if pid == 0:
      _child(case)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == '__main__':
  _serve()
