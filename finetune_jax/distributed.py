"""Several processes, one run: `jax.distributed.initialize` when the run is one of many.

Where the run is one of several processes is decided, in this order:
  - the config: `distributed.num_processes` > 1 (with `distributed.coordinator`,
    `distributed.process_id`);
  - JAX's environment variables: JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES > 1 and
    JAX_PROCESS_ID;
  - a cluster that JAX detects itself: SLURM with more than one task, Open MPI with more
    than one rank, a multi-host Cloud TPU slice.
Then each process sees every device of the job (`jax.devices()`) and its own
(`jax.local_devices()`); one jit-compiled program spans them all (parallel=jit or fsdp).
On CPU the processes reduce over gloo. Only process 0 writes metrics, events and results;
every process takes part in orbax's checkpoints.
"""
import logging
import os
import socket
import time

import jax

from finetune_jax import errors


def _cluster_detected() -> bool:
  """A launcher that started several processes of this job, as JAX detects it."""
  env = os.environ
  return (int(env.get('SLURM_NTASKS', '1')) > 1 or
          int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1 or
          len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1)


def settings(config) -> dict | None:
  """The jax.distributed.initialize arguments of this run, or None for one process."""
  d = config.distributed
  env = os.environ
  if d.num_processes > 1:
    return dict(coordinator_address=d.coordinator, num_processes=d.num_processes,
                process_id=d.process_id)
  if int(env.get('JAX_NUM_PROCESSES', '1')) > 1:
    return dict(coordinator_address=env.get('JAX_COORDINATOR_ADDRESS'),
                num_processes=int(env['JAX_NUM_PROCESSES']),
                process_id=int(env.get('JAX_PROCESS_ID', '-1')))
  if _cluster_detected():
    return {}  # JAX reads them from the cluster
  return None


def check(config) -> None:
  """One ConfigError for a distributed setting that cannot work, before anything starts."""
  found = settings(config)
  if not found:  # one process, or a cluster whose settings JAX reads itself
    return
  if not found['coordinator_address']:
    raise errors.ConfigError('distributed.coordinator', 'A run of several processes needs the '
                             'coordinator\'s host:port (--config.distributed.coordinator=...).')
  if not 0 <= found['process_id'] < found['num_processes']:
    raise errors.ConfigError('distributed.process_id', f'distributed.process_id='
                             f'{found["process_id"]} must be in [0, {found["num_processes"]}).')
  if config.parallel == 'pmap':
    raise errors.ConfigError('parallel', 'parallel=pmap runs within one process; a run of '
                             'several processes needs one program over them all: '
                             '--config.parallel=jit or --config.parallel=fsdp.')


def initialize(config) -> None:
  """Joins the job's other processes, where there are any; call before JAX starts.

  Raises a ConfigError naming the coordinator when a process other than 0 cannot reach
  it within `distributed.timeout_s`.
  """
  check(config)
  found = settings(config)
  if found is None:
    return
  if jax.config.jax_platforms in (None, '', 'cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeout = config.distributed.timeout_s
  if found and found['process_id'] != 0:  # XLA aborts the process where it cannot connect
    _wait_for(found['coordinator_address'], timeout)
  jax.distributed.initialize(**found, initialization_timeout=timeout)
  logging.info('Process %d of %d; %d local of %d devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _wait_for(address: str, timeout_s: float) -> None:
  """Returns once `address` (host:port) accepts a connection; a ConfigError naming it after
  `timeout_s`."""
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise errors.ConfigError(
            'distributed.coordinator', f'Could not join the coordinator at {address} within '
            f'{timeout_s} s ({e}). Check that process 0 runs and that this host reaches that '
            'address.') from None
      time.sleep(0.5)


def is_writer() -> bool:
  """Whether this process writes the run's metrics, events, config and results."""
  return jax.process_index() == 0
