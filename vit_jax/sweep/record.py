"""A sweep's results folder kept apart from its workdir (`--results=DIR`, e.g. under
docs/results/, committed): what each finished run's report needs, so that a new clone
rebuilds the report and a lost workdir (a new machine, a wiped scratch disk) costs at most
the run that was in flight, not the finished ones.

  DIR/runs/STAGE/NAME/metrics.jsonl      the run's metrics (the report reads nothing else
  DIR/runs/STAGE/NAME/sweep_member.json  but these two and the sweep's step_alone.json)
  DIR/runs/STAGE/NAME/params.npz         the final weights of a run that other stages
                                         start from (init_from), read as their init.path

Finished runs are copied into DIR as they finish; a run finished in DIR but not in its
workdir gets its two files copied back into the workdir, so that the runner and the report
see it finished; a stage whose parent is kept starts from the parent's params.npz (the
same arrays as its last checkpoint, which a restored workdir does not have). A report
rebuilt from DIR alone shows runs that had not finished as not started.
"""

import dataclasses
import os
import shutil

from vit_jax.sweep.grid import Member
from vit_jax.sweep.runner import RECORD, is_finished

FILES = (RECORD, 'metrics.jsonl')  # in this order: a run counts as kept once its metrics are
PARAMS = 'params.npz'


def run_dir(results: str, member: Member) -> str:
  return os.path.join(results, 'runs', member.stage.name, member.name)


def _copy(names, source: str, target: str) -> None:
  """Each file whole or not at all (a copy, then a rename), in the order given."""
  os.makedirs(target, exist_ok=True)
  for name in names:
    if os.path.exists(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(target, name + '.tmp'))
      os.replace(os.path.join(target, name + '.tmp'), os.path.join(target, name))


def _export_params(workdir: str, path: str) -> None:
  """The last checkpoint's parameters as an .npz (written whole, then renamed)."""
  from vit_jax import checkpoint, interop  # pylint: disable=import-outside-toplevel
  _, params = checkpoint.load_params(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  interop.export_npz(params, path + '.tmp')
  os.replace(path + '.tmp', path)


def save(members: list[Member], steps: dict, results: str, log=print) -> int:
  """Copies every run finished in its workdir and not yet in RESULTS into it, and the
  weights of those that another stage starts from (also of a run kept before that stage
  was added); returns how many runs it copied."""
  from vit_jax import checkpoint  # pylint: disable=import-outside-toplevel
  parents = {m.parent.label for m in members if m.parent}
  copied = 0
  for member in members:
    target = run_dir(results, member)
    if not is_finished(member.workdir, steps[member.label]):
      continue
    params = os.path.join(target, PARAMS)
    # From the last step's checkpoint only (a restored workdir may hold an interrupted
    # attempt's).
    if (member.label in parents and not os.path.exists(params)
        and checkpoint.saved_steps(member.workdir)[-1:] == [steps[member.label]]):
      _export_params(member.workdir, params)
    if not is_finished(target, steps[member.label]):
      _copy(FILES, member.workdir, target)
      copied += 1
      log(f'{member.label}: kept in {target}')
  return copied


def restore(members: list[Member], steps: dict, results: str, log=print) -> int:
  """Copies every run finished in RESULTS but not in its workdir back into the workdir
  (its metrics and record, not its checkpoints); returns how many."""
  restored = 0
  for member in members:
    source = run_dir(results, member)
    if (is_finished(source, steps[member.label])
        and not is_finished(member.workdir, steps[member.label])):
      _copy(FILES, source, member.workdir)
      restored += 1
  if restored:
    log(f'{restored} finished run(s) taken from {results} (their workdirs were gone or '
        'unfinished).')
  return restored


def with_kept_parent(member: Member, results: str) -> Member:
  """The member, starting from its parent's kept params.npz where there is one (the
  arrays of the parent's last checkpoint: whether or not its workdir still holds them, or
  holds an interrupted attempt's); otherwise unchanged."""
  kept = os.path.join(run_dir(results, member.parent), PARAMS) if member.parent else ''
  if not kept or not os.path.exists(kept):
    return member
  return dataclasses.replace(member, overrides={**member.overrides, 'init.path': kept})
