"""Orbax checkpoints of the train state and the data iterator; weights for a new model.

A workdir's `checkpoints/<step>/` holds two items:
  state: {'step', 'params', 'opt_state', 'model_state', 'ema_params'} (sharded arrays;
         model_state holds BatchNorm statistics where a model has them);
  data:  the input iterator's state (JSON), so that a resumed run reads the batches an
         uninterrupted run would have read.
Saves are asynchronous: training continues while the arrays are written.
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vit_jax import interop


class Checkpointer:
  """Keep-last-K-plus-every-M-th Orbax CheckpointManager over `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int, keep_every: int = 0, asynchronous: bool = True):
    policies = [checkpoint_managers.LatestN(keep)]
    if keep_every:
      policies.append(checkpoint_managers.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=asynchronous, create=True, cleanup_tmp_directories=True)
    # Orbax writes gs:// through tensorstore; local folders must be absolute.
    self.directory = os.path.join(workdir if '://' in workdir else os.path.abspath(workdir),
                                  'checkpoints')
    self.manager = ocp.CheckpointManager(self.directory, item_names=('state', 'data'),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Starts an asynchronous save of `state` and `data_state` at `step`."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

  def restore(self, step: int, abstract_state):
    """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with .sharding).

    The mesh may differ from the one that wrote the checkpoint (another device count or
    axis layout): Orbax reads each shard where the target wants it.
    """
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _find_state_dir(path: str) -> str:
  """Accepts a workdir, its checkpoints/ folder, a step folder or a bare pytree folder."""
  for candidate in (path, os.path.join(path, 'checkpoints')):
    if not os.path.isdir(candidate):
      continue
    steps = [int(d) for d in os.listdir(candidate) if d.isdigit()]
    if steps:
      candidate = os.path.join(candidate, str(max(steps)))
    if os.path.isdir(os.path.join(candidate, 'state')):
      return os.path.join(candidate, 'state')
    if os.path.exists(os.path.join(candidate, '_METADATA')) or os.path.exists(
        os.path.join(candidate, '_CHECKPOINT_METADATA')):
      return candidate
  raise ValueError(f'{path}: no Orbax checkpoint found (expected a workdir, a checkpoints/ '
                   'folder, a step folder or a folder written by scripts/convert_checkpoint.py).')


def load_params(path: str) -> tuple[str, dict]:
  """Reads the parameters of any checkpoint we know, as a tree of numpy arrays.

  Orbax: a workdir (latest step), a step folder, or a pytree folder holding 'params'.
  Files: whatever `interop.load_checkpoint_file` reads (.npz, .safetensors, .pth, ...).
  Returns (description of the source, params).
  """
  if not os.path.exists(path):
    raise ValueError(f'init.path {path!r} does not exist.')
  if os.path.isfile(path):
    return interop.load_checkpoint_file(path)
  # Orbax reads no metadata from a relative folder (and then restores nothing).
  state_dir = _find_state_dir(os.path.abspath(path))
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  if 'params' not in tree:
    raise ValueError(f'{state_dir}: the checkpoint has no "params" entry (found {sorted(tree)}).')
  item = {'params': jax.tree.map(lambda _: 0, tree['params'])}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return f'orbax:{state_dir}', restored['params']
