r"""Command line: train and evaluate a model from a config file.

  python -m vit_jax.main --config=configs/mae_pretrain.py:demo --workdir=runs/mae_demo \
      [--config.global_batch_size=128 ...]

Running the same command again resumes from the last checkpoint in the workdir.

Several processes (a TPU pod, a GPU cluster, or several processes on one machine):
  * TPU pods and SLURM jobs are detected by `jax.distributed.initialize()`;
  * elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I
    (or the environment variables VIT_JAX_COORDINATOR, VIT_JAX_NUM_PROCESSES,
    VIT_JAX_PROCESS_ID); scripts/launch_local.py does this for N local processes.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, with :ARG.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where metrics and checkpoints go.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', os.environ.get('VIT_JAX_COORDINATOR'),
                                   'HOST:PORT of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes',
                                      int(os.environ.get('VIT_JAX_NUM_PROCESSES', 0)) or None,
                                      'Number of processes of a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id',
                                   int(os.environ.get('VIT_JAX_PROCESS_ID', -1)),
                                   'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed() -> None:
  """Joins a multi-process run when there is one; a single process does nothing."""
  import jax  # pylint: disable=import-outside-toplevel
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    if not (_COORDINATOR.value and _NUM_PROCESSES.value and _PROCESS_ID.value >= 0):
      raise app.UsageError('A multi-process run needs --coordinator_address, --num_processes '
                           'and --process_id together.')
    if _PROCESS_ID.value >= _NUM_PROCESSES.value:
      raise app.UsageError(f'--process_id={_PROCESS_ID.value} is not below '
                           f'--num_processes={_NUM_PROCESSES.value}.')
    # Collectives between CPU devices of different processes (tests, laptops); GPU and
    # TPU backends ignore this setting.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _is_cluster():
    jax.distributed.initialize()


def _is_cluster() -> bool:
  """True on a multi-host TPU slice or in a SLURM job of several tasks."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'))
  return bool(hosts) and ',' in hosts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax and TFDS log every save and read at INFO; the progress line is ours to print.
    logging.set_verbosity(logging.WARNING)
  initialize_distributed()
  from vit_jax import train  # pylint: disable=import-outside-toplevel
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FloatingPointError) as e:
    # Bad input is reported in one line, without a traceback through JAX internals.
    print(f'Error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
