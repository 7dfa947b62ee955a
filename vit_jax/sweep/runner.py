"""Running the members of a sweep, one after another, each resumable; a record of each
attempt (command, wall-clock, machine) in its workdir."""

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from vit_jax.sweep.grid import Member, format_value, member_config


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # a line cut by a kill
  return rows


def is_finished(workdir: str, steps: int) -> bool:
  """True when the run evaluated at its last step."""
  return any(r.get('step') == steps and any(k.startswith('eval/') for k in r)
             for r in read_metrics(workdir))


RECORD = 'sweep_member.json'  # in each member's workdir: command and wall-clock of attempts


def _record(workdir: str) -> dict:
  path = os.path.join(workdir, RECORD)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {'attempts': []}


def _error_line(output: str) -> str:
  """The last `Error:` line of a command's output, else its last line."""
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith('Error:')]
  return (errors or lines or ['(no output)'])[-1]


def machine() -> str:
  """The CPU, its cores and the JAX version, for the record of where a run ran."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  cpu = 'unknown CPU'
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                 cpu)
  return f'{cpu}, {os.cpu_count()} cores, jax {metadata.version("jax")}'


class Stop(Exception):
  """A SIGTERM or Ctrl-C stopped the sweep (the run saved its step)."""


def run_member(member: Member, alone: float | None = None) -> tuple[bool, str]:
  """Runs (or resumes) one member; returns (ok, message). Its output goes to log.txt; the
  record of the attempt holds `alone`, the images/s of its step alone measured in this
  sitting (measure_steps_alone)."""
  os.makedirs(member.workdir, exist_ok=True)
  command = member.command(sys.executable)
  log_path = os.path.join(member.workdir, 'log.txt')
  record = _record(member.workdir)
  record['command'] = shlex.join(member.command())
  start = time.time()
  with open(log_path, 'a') as out:
    out.write(f'\n$ {shlex.join(command)}\n')
    out.flush()
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    stopping = []

    def stop(*_):  # SIGTERM or Ctrl-C: the run saves its step and exits, then so do we
      stopping.append(True)
      process.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
      try:
        returncode = process.wait()
      except KeyboardInterrupt:
        stop()
        returncode = process.wait()
    finally:
      signal.signal(signal.SIGTERM, previous)
  seconds = time.time() - start
  record['attempts'].append({'start': start, 'seconds': seconds, 'returncode': returncode,
                             'machine': machine(), 'images_per_sec_alone': alone})
  with open(os.path.join(member.workdir, RECORD), 'w') as f:
    json.dump(record, f, indent=1)
  if stopping or returncode < 0:
    raise Stop()
  if returncode:
    with open(log_path, errors='replace') as f:
      error = _error_line(f.read())
    return False, f'{error} (exit {returncode}; log: {log_path})'
  return True, f'{seconds / 60:.1f} min'


def run(members: list[Member], steps: dict, log=print, before=None, after=None,
        alone: dict | None = None) -> list[str]:
  """Runs every unfinished member whose parent finished; returns the failures. `before`
  may replace a member right before it runs (record.with_kept_parent); `after` is called
  after each member that finished; `alone` ({step_key: images/s}, measure_steps_alone)
  goes into each attempt's record."""
  failed = {}
  todo = [m for m in members if not is_finished(m.workdir, steps[m.label])]
  log(f'{len(members) - len(todo)} of {len(members)} members finished; running {len(todo)}.')
  for i, member in enumerate(todo, 1):
    head = f'[{i}/{len(todo)}] {member.label}'
    if member.parent and not is_finished(member.parent.workdir, steps[member.parent.label]):
      failed[member.label] = f'not run: its parent {member.parent.label} did not finish'
      log(f'{head}: {failed[member.label]}')
      continue
    log(f'{head}: running ({steps[member.label]} steps, log in {member.workdir}/log.txt)')
    ok, message = run_member(before(member) if before else member,
                             (alone or {}).get(step_key(member)))
    if ok and not is_finished(member.workdir, steps[member.label]):
      ok, message = False, ('exited without evaluating its last step (log: '
                            f'{member.workdir}/log.txt)')
    if not ok:
      failed[member.label] = message
    log(f'{head}: {"done in " if ok else "FAILED: "}{message}')
    if ok and after:
      after()
  return [f'{label}: {message}' for label, message in failed.items()]


# ------------------------------------------------------------- the step alone

ALONE = 'step_alone.json'  # in the sweep's results: {step_key: the latest measurement}
# Config keys that say how long a run is, what it reads, evaluates and keeps, or only set
# the values of numbers the step computes with: two members that differ in nothing else
# run the same step (a fine-tuning of 20 epochs and one of 40; a learning rate; a seed).
# Anything else (the model, the objective, the batch, the optimizer, mixup, layer decay,
# which adds a pass over the parameters) is a different step.
NOT_STEP_KEYS = ('num_epochs', 'total_steps', 'seed', 'init.', 'fewshot.', 'data.',
                 'eval_batch_size', 'eval_every_steps', 'log_every_steps',
                 'checkpoint_every_steps', 'keep_checkpoint', 'profile_steps',
                 'optim.base_lr', 'optim.min_lr', 'optim.warmup_epochs', 'optim.lr_batch_base',
                 'optim.weight_decay', 'label_smoothing')
# Overrides that earlier versions keyed the step by (with the stage's config string).
LEGACY_SPEED_KEYS = ('model.', 'model_name', 'objective', 'global_batch_size',
                     'grad_accum_steps', 'mesh', 'sharding_rules')
SHARED_SLOWDOWN = 0.25  # a run this much slower than its step alone shared the machine


def _override_flags(member: Member, keep) -> list[str]:
  """The member's command-line overrides whose key passes `keep`, in a fixed order."""
  return [f'--config.{k}={format_value(v)}' for k, v in sorted(member.overrides.items())
          if keep(k)]


def _step_flags(member: Member) -> list[str]:
  """The member's overrides that can change its step."""
  return _override_flags(member, lambda k: not k.startswith(NOT_STEP_KEYS))


def step_key(member: Member) -> str:
  """The config file and a digest of the member's config without NOT_STEP_KEYS (the
  dataset's name kept: it sets the head): members with the same key run the same step."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(member_config(member).to_dict(), sep='.')
  values = {k: v for k, v in flat.items() if not k.startswith(NOT_STEP_KEYS) or k == 'data.name'}
  digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode())
  return f'{member.stage.config.split(":")[0]} step {digest.hexdigest()[:12]}'


def _legacy_step_key(member: Member) -> str:
  """The key of earlier versions: the stage's config string (run-length arguments and all)
  and the overrides of LEGACY_SPEED_KEYS."""
  return ' '.join([member.stage.config]
                  + _override_flags(member, lambda k: k.startswith(LEGACY_SPEED_KEYS)))


def _read_alone_file(root: str) -> dict:
  path = os.path.join(root, ALONE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def read_steps_alone(root: str) -> dict:
  """{step_key: images/s of the step alone, run back to back as a loop runs it}, the latest
  measurement of each. Entries of older sweeps (a bare number: the best of 10 steps timed
  one at a time, 5-15% above what the same steps sustain back to back) are left out
  (old_steps_alone counts them)."""
  return _back_to_back(_read_alone_file(root))


def _back_to_back(entries: dict) -> dict:
  return {key: rates['back_to_back'] for key, rates in entries.items() if isinstance(rates, dict)}


def old_steps_alone(root: str) -> int:
  """How many entries of ROOT/step_alone.json an older sweep wrote (see read_steps_alone)."""
  return sum(not isinstance(rates, dict) for rates in _read_alone_file(root).values())


def alone_for(member: Member, stored: dict) -> float | None:
  """The images/s of the member's step alone that its run is judged against (`stored`:
  read_steps_alone): the one measured in the sitting of its longest attempt (run_member
  records it, None where it was not measured); for an attempt of an earlier version
  (no such field), the entry of the legacy key; else the latest of its step."""
  attempts = _record(member.workdir)['attempts']
  longest = max(attempts, key=lambda a: a['seconds']) if attempts else {}
  if longest.get('images_per_sec_alone'):
    return longest['images_per_sec_alone']
  if longest and 'images_per_sec_alone' not in longest:  # an earlier version's attempt
    legacy = stored.get(_legacy_step_key(member))
    if legacy:
      return legacy
  return stored.get(step_key(member))


def measure_steps_alone(members: list[Member], root: str, num_classes: dict, log=print) -> dict:
  """{step_key: images/s} of the members' training steps alone on this machine, now: 20
  steps of scripts/benchmark.py on each distinct step's config, run back to back (at most
  two in flight, as the loop runs them, with no input pipeline), kept in
  ROOT/step_alone.json beside the best of the same steps timed one at a time, the machine
  and the date. Pass the members still to run: a sweep measures at each start, since a
  study resumed on another day may run on a faster or slower machine (measured here:
  fine-tuning 340 against 550 images/s in two sittings), and a run is judged
  against its own sitting's step. Run it while nothing else is running. A step that fails
  to compile is left out (its run reports the error); nothing is measured where the
  script is not there (an installed package without the repository's scripts/)."""
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), 'scripts', 'benchmark.py')
  if not os.path.exists(script):
    log(f'Not measuring the steps alone: {script} is not there.')
    return {}
  # Older sweeps' bare numbers (one step at a time) are dropped: old_steps_alone counts 0.
  stored = {k: v for k, v in _read_alone_file(root).items() if isinstance(v, dict)}
  measured, tried = {}, set()
  for member in members:
    key = step_key(member)
    if key in tried:
      continue
    tried.add(key)
    described = ' '.join([member.stage.config, *_step_flags(member)])
    log(f'The step alone: {described} ...')
    with tempfile.TemporaryDirectory() as tmp:
      output = os.path.join(tmp, 'rows.jsonl')
      command = ([sys.executable, script, f'--config={member.stage.config}',
                  *_step_flags(member), f'--num_classes={num_classes[member.label]}',
                  '--steps=20', '--warmup=3', f'--output={output}'])
      result = subprocess.run(command, capture_output=True, text=True, check=False)
      if result.returncode:  # the run will say what is wrong; its speed stays unknown
        log(f'  not measured: {_error_line(result.stderr or result.stdout)}')
        continue
      with open(output) as f:
        row = json.loads(f.readline())
    stored[key] = {'back_to_back': row['images_per_s_sustained'],
                   'one_at_a_time': row['images_per_s'], 'machine': machine(),
                   'date': time.strftime('%Y-%m-%d'),
                   'measured_for': described}
    measured[key] = stored[key]['back_to_back']
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ALONE + '.tmp'), 'w') as f:
      json.dump(stored, f, indent=1)
    os.replace(os.path.join(root, ALONE + '.tmp'), os.path.join(root, ALONE))
    log(f'  {stored[key]["back_to_back"]:.1f} images/s back to back '
        f'({stored[key]["one_at_a_time"]:.1f} one step at a time)')
  return measured


def shared_machine(images_per_sec: float, alone: float) -> bool:
  """Whether a run's median images/s is more than SHARED_SLOWDOWN below its step alone
  (back to back)."""
  return images_per_sec < (1 - SHARED_SLOWDOWN) * alone
