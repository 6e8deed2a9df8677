"""SIGTERM and SIGINT as a request to stop cleanly (preemption, a scheduler's kill, Ctrl-C).

The first signal sets `StopRequest.signum`; the training loop sees it after the step it is
on, saves a checkpoint at that step, flushes its metrics and returns (train.py). A second
signal exits at once: whatever the first was saving is an orbax temporary directory that is
never read as a checkpoint (checkpoint.py), so nothing already saved is lost.

A run of several processes leaves both signals alone: there, JAX's preemption notifier owns
SIGTERM and the processes stop together at orbax's preemption sync point.
"""
import logging
import os
import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """A context in which SIGTERM and SIGINT request a stop instead of killing the process.

  Outside the main thread (Python delivers signals only there) it installs nothing.
  """

  def __init__(self, enabled: bool = True):
    self.signum = None
    self._enabled = enabled and threading.current_thread() is threading.main_thread()
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def exit_code(self) -> int:
    """The shell's convention for a process ended by the signal: 128 + its number."""
    return 128 + (self.signum or signal.SIGTERM)

  def __enter__(self):
    if self._enabled:
      for signum in HANDLED:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: the user insists
      os.write(2, f'{signal.Signals(signum).name} again: exiting now.\n'.encode())
      os._exit(128 + signum)
    self.signum = signum
    logging.warning('%s received: saving a checkpoint at the current step, then exiting '
                    '(send it again to exit at once).', signal.Signals(signum).name)
