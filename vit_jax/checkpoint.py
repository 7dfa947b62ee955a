"""Orbax checkpoints of the train state and the data iterator; weights for a new model.

A workdir's `checkpoints/<step>/` holds two items:
  state: {'step', 'params', 'opt_state', 'model_state', 'ema_params'} (sharded arrays;
         model_state holds BatchNorm statistics where a model has them);
  data:  the input iterator's state (JSON), so that a resumed run reads the batches an
         uninterrupted run would have read.
Saves are asynchronous: training continues while the arrays are written; a save that
fails (a full disk) stops the run at once with one line, keeping the last good checkpoint.

Resuming takes the newest checkpoint that reads back. A newer one that does not (a
truncated or overwritten array file, empty metadata) is moved to
`workdir/checkpoints_skipped/<step>` with a one-line warning, so that nothing is lost and
the step can be written again; Orbax ignores (and removes) a save that never finished.
"""

import contextlib
import logging
import os
import re
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from vit_jax import interop, platform

SKIPPED_DIR = 'checkpoints_skipped'
COMMIT_FILE = 'commit_success.txt'  # Orbax's mark of a finished save in a bucket


class CheckpointFailure(RuntimeError):
  """A checkpoint cannot be written, or none can be read back; the message is one line
  that says what to do."""


class WorkdirFailure(CheckpointFailure):
  """Another file of the workdir (metrics, TensorBoard) could not be written. A save may
  still be in flight, retrying against a bucket that has gone away: the process should
  exit at once (os._exit), without waiting for it."""


def error_reason(error: BaseException) -> str:
  """One line for an error that Orbax or TensorStore raised, often long and nested."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0][:300] if lines else "(no message)"}'


class Checkpointer:
  """Keep-last-K-plus-every-M-th Orbax CheckpointManager over `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int, keep_every: int = 0, asynchronous: bool = True):
    policies = [checkpoint_managers.LatestN(keep)]
    if keep_every:
      policies.append(checkpoint_managers.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=asynchronous, create=True, cleanup_tmp_directories=True)
    # Orbax writes gs:// through tensorstore.
    self.workdir = _absolute(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    # Listed before the manager removes them, to say which save never finished.
    self.unfinished = _unfinished_saves(self.directory)
    self.manager = ocp.CheckpointManager(self.directory, item_names=('state', 'data'),
                                         options=options)
    self._pending = None  # step of a save not yet known to have succeeded
    self._failed = False  # a failed save was reported
    self._abandoned = False  # the workdir failed: close() waits for nothing

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts an asynchronous save of `state` and `data_state` at `step`.

    Raises CheckpointFailure if the previous save failed, or this one cannot start."""
    if self._pending is not None:  # (Orbax waits for it too): a failure names its own step
      self.wait()
    self._surface_failure(step, self.manager.save, step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)
    self._pending = step

  def check(self) -> None:
    """Raises CheckpointFailure if a background save has failed; never waits for one.

    One process only: with several, each could see the save end at another step, so
    there a failure surfaces at the next save, the same step on every process."""
    if self._pending is None or jax.process_count() > 1:
      return
    if not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    self._surface_failure(self._pending, self.manager.wait_until_finished)
    self._pending = None

  def stop_for(self, error: BaseException) -> WorkdirFailure:
    """The error that ends a run whose workdir could not be written (`error`, one line
    that names the file); close() then waits for nothing."""
    self._failed = self._abandoned = True
    if self._pending is not None and not self.manager.is_saving_in_progress():
      try:  # ended: learn whether it succeeded (this does not wait)
        self.manager.wait_until_finished()
        self._pending = None
      except Exception:  # pylint: disable=broad-except
        pass
    # Not listed again: a bucket that has gone away would take gcsfs's retries to answer.
    # A save still in flight, or one that failed, is not a good checkpoint.
    good = [s for s in self.manager.all_steps() if s != self._pending]
    return WorkdirFailure(f'{error}; the workdir {self.workdir} cannot be written. '
                          f'Stopped: nothing after this is saved. '
                          + resume_advice(self.workdir, good))

  def close(self) -> None:
    """Waits for the last save; after a failure already reported, only releases Orbax."""
    if self._abandoned:
      return
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise

  def _surface_failure(self, step, call, *args, **kwargs):
    """call(*args, **kwargs); its failure becomes a one-line CheckpointFailure that names
    the save of `step` (None: no save involved, the error is raised as it is)."""
    try:
      return call(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if step is None:
        raise
      self._pending, self._failed = None, True
      if not is_remote(self.workdir):  # (a bucket that has gone away would not answer)
        self.manager.reload()
      good = [s for s in self.manager.all_steps() if s != step]  # it may list the failed one
      raise CheckpointFailure(
          f'Saving checkpoint {step} to {self.directory} failed ({error_reason(e)}); '
          f'{_free_space(self.workdir)}. Stopped: nothing after this is saved. '
          + resume_advice(self.workdir, good)) from None

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding).

    The mesh may differ from the one that wrote the checkpoint (another device count or
    axis layout): Orbax reads each shard where the target wants it.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def restore_latest(self, abstract_state, *, restart_from_scratch: bool = False, log=print):
    """(step, state, data_state) of the newest checkpoint that reads back, or None.

    Newer ones that fail are moved to checkpoints_skipped/, each with a warning line.
    When every checkpoint fails, raises CheckpointFailure and moves nothing, unless
    `restart_from_scratch` (then all are moved aside and None is returned).
    """
    for name in self.unfinished:
      log(f'Warning: skipped {self.directory}/{name}: a save that never finished '
          '(the process died, or lost the workdir, while writing it); Orbax removes it.')
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state, data_state = self.restore(step, abstract_state)
        error = None
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if not _all_processes_succeeded(error is None):
        failed.append((step, error_reason(error) if error
                       else 'it failed to read on another process'))
        continue
      self._set_aside(failed, log)
      return step, state, data_state
    if failed and not restart_from_scratch:
      raise CheckpointFailure(
          f'No checkpoint in {self.directory} reads back: '
          + '; '.join(f'step {s}: {why}' for s, why in failed)
          + '. Nothing was changed. Rerun with --restart_from_scratch to train from step 0 '
          f'in this workdir (the checkpoints are moved to {SKIPPED_DIR}/), or use another '
          '--workdir.')
    self._set_aside(failed, log)
    return None

  def _set_aside(self, failed, log) -> None:
    """Moves failed step folders to workdir/checkpoints_skipped/ (kept for inspection)."""
    if not failed:
      return
    if jax.process_index() == 0:
      skipped = epath.Path(self.workdir) / SKIPPED_DIR
      skipped.mkdir(parents=True, exist_ok=True)
      for step, why in failed:
        target = skipped / str(step)
        if target.exists():
          target = skipped / f'{step}.{time.strftime("%Y%m%d-%H%M%S")}'
        (epath.Path(self.directory) / str(step)).rename(target)
        log(f'Warning: skipped checkpoint {self.directory}/{step} ({why}); moved it to '
            f'{target}.')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('vit_jax:checkpoints_set_aside')
    self.manager.reload()


def _step_folders(directory: epath.Path) -> list[int]:
  """The steps of the step folders (named by their step) in `directory`, if it exists."""
  if not directory.is_dir():
    return []
  return [int(p.name) for p in directory.iterdir() if p.name.isdigit()]


def saved_steps(workdir: str) -> list[int]:
  """The steps of workdir/checkpoints's step folders, in order."""
  return sorted(_step_folders(epath.Path(workdir) / 'checkpoints'))


def has_saved_steps(workdir: str) -> bool:
  """Whether workdir/checkpoints holds a step folder: the run will resume, not initialise."""
  return bool(saved_steps(workdir))


def _all_processes_succeeded(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _unfinished_saves(directory: str) -> list[str]:
  """Names of step folders that Orbax left unfinished (a save cut short): on local disk a
  temporary folder renamed when the save ends; in a bucket, where a rename copies every
  object, the step folder itself, finished by a commit_success.txt written last."""
  path = epath.Path(directory)
  if not path.is_dir():
    return []
  if directory.startswith('gs://'):  # Orbax's commit-file saves (gcs_utils.is_gcs_path)
    names = [p.name for p in path.iterdir()
             if p.name.isdigit() and not (p / COMMIT_FILE).exists()]
  else:
    names = [p.name for p in path.iterdir()
             if re.fullmatch(r'\d+\.orbax-checkpoint-tmp.*', p.name)]
  return sorted(names, key=lambda n: int(n.split('.')[0]))


def _free_space(path: str) -> str:
  if is_remote(path):
    return (f'the workdir {path} cannot be written (check that the bucket answers, and the '
            'credentials)')
  try:
    return f'{shutil.disk_usage(path).free / 2**20:.1f} MiB free in the workdir {path}'
  except OSError:
    return f'unknown space free in the workdir {path}'


def resume_advice(workdir: str, good_steps) -> str:
  """What to do after the workdir could not be written: which checkpoint a rerun of the
  same command resumes from, once the disk has space or the bucket answers again."""
  fix = ('once the bucket can be written again' if is_remote(workdir) else
         'free space (or move the workdir) and')
  if good_steps:
    return (f'The last good checkpoint is step {max(good_steps)}; {fix} run the same command '
            'to resume from it.')
  return f'No checkpoint of this run was saved; {fix} run the same command to start it again.'


def is_remote(path: str) -> bool:
  return '://' in str(path)


def _absolute(path: str) -> str:
  """Local folders made absolute (Orbax reads no metadata from a relative one and then
  restores nothing); gs:// paths as they are."""
  return path if '://' in path else os.path.abspath(path)


def _find_state_dir(path: str) -> str:
  """Accepts a workdir, its checkpoints/ folder, a step folder or a bare pytree folder,
  local or gs://."""
  root = epath.Path(path)
  for candidate in (root, root / 'checkpoints'):
    if not candidate.is_dir():
      continue
    steps = _step_folders(candidate)
    if steps:
      candidate = candidate / str(max(steps))
    if (candidate / 'state').is_dir():
      return os.fspath(candidate / 'state')
    if (candidate / '_METADATA').exists() or (candidate / '_CHECKPOINT_METADATA').exists():
      return os.fspath(candidate)
  raise ValueError(f'{path}: no Orbax checkpoint found (expected a workdir, a checkpoints/ '
                   'folder, a step folder or a folder written by scripts/convert_checkpoint.py).')


@contextlib.contextmanager
def _quiet_item_metadata():
  """Drops Orbax's 'Metadata file does not exist' warning for an item folder (state/)
  read on its own: a step's metadata file lives one level up, so it is not missing."""
  note_filter = platform.DropMessages(('Metadata file does not exist',))
  logger = logging.getLogger('absl')
  logger.addFilter(note_filter)
  try:
    yield
  finally:
    logger.removeFilter(note_filter)


def load_params(path: str, *, model_state: bool = False) -> tuple[str, dict]:
  """Reads the parameters of any checkpoint we know, as a tree of numpy arrays.

  Orbax: a workdir (latest step), a step folder, or a pytree folder holding 'params'.
  Files: whatever `interop.load_checkpoint_file` reads (.npz, .safetensors, .pth, ...).
  Either may be local or on gs://.
  Returns (description of the source, params); with `model_state`, (source,
  {'params': ..., **model_state}): the variables the model applies with, BatchNorm
  statistics included where a training state has them (files have none).
  """
  if not epath.Path(path).exists():
    raise ValueError(f'init.path {path!r} does not exist.')
  if epath.Path(path).is_file():
    source, params = interop.load_checkpoint_file(path)
    return (source, {'params': params}) if model_state else (source, params)
  state_dir = _find_state_dir(_absolute(path))
  checkpointer = ocp.PyTreeCheckpointer()
  with _quiet_item_metadata():
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    if 'params' not in tree:
      raise ValueError(f'{state_dir}: the checkpoint has no "params" entry (found {sorted(tree)}).')
    names = ('params', 'model_state') if model_state and tree.get('model_state') else ('params',)
    item = {name: jax.tree.map(lambda _: 0, tree[name]) for name in names}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  source = f'orbax:{state_dir}'
  if not model_state:
    return source, restored['params']
  return source, {'params': restored['params'], **restored.get('model_state', {})}


def check_initial_params(init_config, model, abstract_params) -> tuple[str, dict]:
  """Reads init.path and fits it to the model's parameter shapes, before anything compiles.

  Returns (source, params) for `train.load_initial_params`; raises a one-line ValueError
  when the file is not a checkpoint or does not fit (shapes, missing or extra names).
  """
  try:
    source, loaded = load_params(init_config.path)
  except ValueError:  # already one line that names the path
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'init.path={init_config.path!r} is not a checkpoint that vit_jax reads '
                     f'({error_reason(e)}); give a training workdir, an Orbax folder or a '
                     '.npz/.safetensors/.pth file.') from None
  stand_in = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_params)
  interop.fit_params(loaded, stand_in, reinit=tuple(init_config.reinit),
                     allow_missing=tuple(init_config.allow_missing),
                     ignore_unexpected=tuple(init_config.ignore_unexpected),
                     new_grid=getattr(model, 'grid', None), source=init_config.path)
  return source, loaded
