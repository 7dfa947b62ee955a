r"""Command line: train and evaluate a model from a config file.

  python -m vit_jax.main --config=configs/mae_pretrain.py:demo --workdir=runs/mae_demo \
      [--config.global_batch_size=128 ...]

Running the same command again resumes from the last checkpoint in the workdir that reads
back; a newer one that does not (a truncated file, an unfinished save) is moved to
`workdir/checkpoints_skipped/` with a warning. When none reads back the run stops, unless
--restart_from_scratch says to train from step 0 in that workdir.

Bad input (an unknown config key, config file or `:ARG`, a dataset that is not prepared,
a checkpoint that does not fit, a failed save) ends the run with one `Error:` line that
names the value and the fix, and exit status 1 (2 for the command line itself).

Several processes (a TPU pod, a GPU cluster, or several processes on one machine):
  * TPU pods and SLURM jobs are detected by `jax.distributed.initialize()`;
  * elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I
    (or the environment variables VIT_JAX_COORDINATOR, VIT_JAX_NUM_PROCESSES,
    VIT_JAX_PROCESS_ID); scripts/launch_local.py does this for N local processes.
"""

import difflib
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Unlocked while the command line is parsed so that --config.model.FIELD works for every
# field get_model accepts, set in the config file or not; _checked_config then refuses any
# other new key and locks the config.
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, with :ARG.',
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where metrics and checkpoints go.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', os.environ.get('VIT_JAX_COORDINATOR'),
                                   'HOST:PORT of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes',
                                      int(os.environ.get('VIT_JAX_NUM_PROCESSES', 0)) or None,
                                      'Number of processes of a multi-process run.')
_PROCESS_ID = flags.DEFINE_integer('process_id',
                                   int(os.environ.get('VIT_JAX_PROCESS_ID', -1)),
                                   'This process, 0 .. num_processes - 1.')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', int(os.environ.get('VIT_JAX_HEARTBEAT_TIMEOUT', 100)),
    "Multi-process runs: JAX's coordination service declares a process dead after this "
    'long without its heartbeat and stops the others (JAX default 100).')
_SHUTDOWN = flags.DEFINE_integer(
    'shutdown_timeout_seconds', int(os.environ.get('VIT_JAX_SHUTDOWN_TIMEOUT', 300)),
    'Multi-process runs: how long a finished process waits at exit for the others '
    '(JAX default 300).')
_RESTART = flags.DEFINE_bool('restart_from_scratch', False,
                             'Train from step 0 in a workdir whose checkpoints all fail to '
                             'read back (they are moved to checkpoints_skipped/).')
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
                               process_id=_PROCESS_ID.value, **_timeouts())
  elif _is_cluster():
    jax.distributed.initialize(**_timeouts())
  else:
    return
  # JAX ends a process whose peer died from C++ (a check failure, then 'Fatal Python
  # error: Aborted'), which Python cannot intercept: what it means is said here, first.
  print(f'Process {jax.process_index()} of {jax.process_count()}: if a process dies, JAX '
        f'stops the others within about {_HEARTBEAT.value} s (--heartbeat_timeout_seconds) '
        "with 'Fatal Python error: Aborted'; then run the same command on every process to "
        'resume from the last checkpoint that all of them completed.', flush=True)


def _timeouts() -> dict:
  for flag in (_HEARTBEAT, _SHUTDOWN):
    if flag.value < 1:
      raise app.UsageError(f'--{flag.name}={flag.value} must be at least 1.')
  return dict(heartbeat_timeout_seconds=_HEARTBEAT.value,
              shutdown_timeout_seconds=_SHUTDOWN.value)


def _is_cluster() -> bool:
  """True on a multi-host TPU slice or in a SLURM job of several tasks."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'))
  return bool(hosts) and ',' in hosts


def _flatten(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items') and prefix + key != 'model':
      yield from _flatten(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def _checked_config():
  """The parsed config, locked; a key the config file does not have is refused (only
  config.model takes new keys: get_model checks them against the model's fields)."""
  path = flags.FLAGS['config'].config_filename
  file, _, arg = path.partition(':')
  from vit_jax import config_utils  # pylint: disable=import-outside-toplevel
  fresh = config_utils.load_config_file(file, arg)
  config = _CONFIG.value
  known = set(_flatten(fresh))
  for key in sorted(set(_flatten(config)) - known):
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f'did you mean --config.{close[0]}?' if close else (
        f'the keys are those of {path.split(":")[0]} and config_utils.base_config()')
    raise ValueError(f'--config.{key}: {path} has no such key; {hint}')
  config.lock()
  return config


def _one_line(error: BaseException) -> str:
  """The message of a command-line error without the tracebacks that absl and
  ml_collections wrap around it."""
  message = str(error).strip()
  if 'Traceback (most recent call last)' in message:  # a config file's get_config raised
    message = message.splitlines()[-1]
    message = re.sub(r'^[\w.]*(Error|Exception): ', '', message)
  message = message.replace('Error whilst parsing config file:', '').strip()
  return ' '.join(message.split())


def parse_flags(argv):
  """absl's flag parsing, with one `Error:` line (exit status 2) instead of a traceback
  for an unknown --config key, a missing config file or a `:ARG` it refuses."""
  try:
    for arg in argv[1:]:
      if arg.startswith(('--config=', '-config=')):
        path = arg.split('=', 1)[1]
        if not os.path.isfile(path.split(':', 1)[0]):
          raise ValueError(f'--config={path}: there is no file {path.split(":", 1)[0]!r}; '
                           'give a config file such as configs/vit_scratch.py:demo.')
    remaining = flags.FLAGS(argv)
    if flags.FLAGS['config'].present:
      _checked_config()
    return remaining
  except (flags.Error, OSError, KeyError, AttributeError, TypeError, ValueError) as e:
    print(f'Error: {_one_line(e)}', file=sys.stderr)
    sys.exit(2)


class _ReportedElsewhere(std_logging.Filter):
  """Drops the tracebacks that Orbax and asyncio log for each failed write of a failed
  save or restore (hundreds of lines for one full disk), and gcsfs for a request out of
  retries: the run reports the failure in one line, and --verbosity=0 shows them all."""

  def filter(self, record):
    return not (record.levelno >= std_logging.ERROR
                and (record.name in ('asyncio', 'gcsfs')
                     or f'{os.sep}orbax{os.sep}' in record.pathname))


def _is_closed_loop_error(error) -> bool:
  """TensorStore's callbacks raise this, once per pending write, into the event loop of a
  save or restore that Orbax has already given up on; the failure itself is reported."""
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


def _quiet_hooks() -> None:
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def quiet_excepthook(kind, value, traceback):
    if not _is_closed_loop_error(value):
      excepthook(kind, value, traceback)

  def quiet_unraisablehook(unraisable):
    if not _is_closed_loop_error(unraisable.exc_value):
      unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    # Orbax and TFDS log every save and read at INFO; the progress line is ours to print.
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_handler().addFilter(_ReportedElsewhere())
    _quiet_hooks()
  from vit_jax import platform  # pylint: disable=import-outside-toplevel
  platform.skip_absent_tpu()
  platform.use_every_cpu_core()
  platform.hide_notes_that_are_not_problems()
  initialize_distributed()
  from vit_jax import checkpoint, data, train  # pylint: disable=import-outside-toplevel
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             restart_from_scratch=_RESTART.value)
  except (ValueError, FloatingPointError, data.MissingDatasetError,
          checkpoint.CheckpointFailure) as e:
    # Bad input is reported in one line, without a traceback through JAX internals.
    print(f'Error: {" ".join(str(e).split())}', file=sys.stderr)
    if isinstance(e, checkpoint.WorkdirFailure):
      # A save in flight may still be retrying against the workdir (minutes for a bucket
      # that has gone away); nothing more can be written, so nothing is waited for.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)
    sys.exit(1)


def cli():
  """Console entry point (vit-jax-train)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
