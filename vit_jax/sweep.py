r"""Sweeps: a grid of ordinary `vit_jax.main` runs, their results collected, compared, drawn.

  python -m vit_jax.sweep --sweep=configs/sweeps/mae_mask_ratio.py --workdir=runs/mask_ratio
  python -m vit_jax.sweep ... --report          # tables and plots from what has finished
  python -m vit_jax.sweep ... --launch=print    # SLURM job arrays and TPU-VM lines instead

A sweep file defines `get_sweep()` returning a `Sweep`: stages, each a base config
(`file.py:arg`) with fixed overrides and a grid of swept overrides. A stage may start
from another stage's runs (`init_from='pretrain'`): it gets one member per member of that
stage (times its own grid), with `init.path` set to the sibling's workdir. Every member
runs in `WORKDIR/STAGE/NAME`, NAME spelling its swept values (`mask_ratio=0.75,seed=1`).

Running the same command again skips finished members and resumes an interrupted one
(the loop resumes bit for bit from its last checkpoint). A member that fails is reported
with its error line and the others go on; the command exits 1 at the end if any failed.
After the runs (or with --report) the workdir gets results.csv, results.md and PNG plots.
"""

import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Iterable

import numpy as np

# ----------------------------------------------------------------------- sweep files


def product(*axes) -> list[dict]:
  """The cartesian product of grids. Each axis is a dict {key: [values]} (itself a
  product over its keys, in order) or a list of override dicts (e.g. from `zipped`).

  product({'a': [1, 2]}, {'seed': [0, 1]}) -> [{a:1,seed:0}, {a:1,seed:1}, {a:2,...}, ...]
  """
  grids = []
  for axis in axes:
    if isinstance(axis, dict):
      keys = list(axis)
      grids.append([dict(zip(keys, values))
                    for values in itertools.product(*(_as_list(axis[k], k) for k in keys))])
    else:
      grids.append([dict(member) for member in axis])
  return [dict(itertools.chain.from_iterable(m.items() for m in combo))
          for combo in itertools.product(*grids)]


def zipped(axis: dict) -> list[dict]:
  """Values taken together: zipped({'model.width': [64, 128], 'model.depth': [2, 4]}) ->
  [{width 64, depth 2}, {width 128, depth 4}]. All lists must have the same length."""
  lengths = {k: len(_as_list(v, k)) for k, v in axis.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'zipped: the value lists have different lengths {lengths}.')
  keys = list(axis)
  return [dict(zip(keys, values)) for values in zip(*(axis[k] for k in keys))]


def _as_list(values, key) -> list:
  if not isinstance(values, (list, tuple)):
    raise ValueError(f'The values of {key!r} must be a list, not {values!r}.')
  return list(values)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One kind of run in a sweep.

  Attributes:
    name: the stage's folder under the sweep's workdir ('pretrain', 'finetune', ...).
    config: the base config, 'configs/FILE.py:ARG' (relative to the repository root or
      the current directory).
    overrides: fixed `config.KEY` values of every member, {'data.name': 'fashion_mnist'}.
    grid: the swept overrides, a list of dicts (see `product` and `zipped`); [{}] is one run.
    init_from: a stage whose members each start this stage's runs (init.path is set to
      that member's workdir); '' for none.
    inherit: keys of the parent member's swept values also applied to this stage's
      config (e.g. 'seed': a fine-tuning run uses its pretraining run's seed).
  """
  name: str
  config: str
  overrides: dict = dataclasses.field(default_factory=dict)
  grid: list = dataclasses.field(default_factory=lambda: [{}])
  init_from: str = ''
  inherit: tuple = ('seed',)


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Stages in dependency order, and how to report them.

  Attributes:
    stages: the stages; one named in `init_from` must come before the stage naming it.
    scaling: for compute-scaling sweeps, the swept key that names the model size (one
      curve per value), e.g. 'model.width'; '' for none.
    title: the heading of results.md.
  """
  stages: list
  scaling: str = ''
  title: str = ''


@dataclasses.dataclass
class Member:
  """One run of a sweep."""
  stage: Stage
  name: str
  workdir: str
  values: dict  # the swept values that name it, its parents' included (for the report)
  overrides: dict  # every config.KEY override its command line gets
  parent: 'Member | None' = None

  @property
  def label(self) -> str:
    return f'{self.stage.name}/{self.name}'

  def command(self, python: str = 'python') -> list[str]:
    return ([python, '-m', 'vit_jax.main', f'--config={self.stage.config}',
             f'--workdir={self.workdir}'] +
            [f'--config.{k}={format_value(v)}' for k, v in self.overrides.items()])


def format_value(value) -> str:
  """A config value as config_flags parses it from the command line."""
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return str(value)


def load_sweep(path: str) -> Sweep:
  """Runs the sweep file's get_sweep()."""
  if not os.path.isfile(path):
    raise ValueError(f'--sweep={path!r}: no such file (sweep files are in configs/sweeps/).')
  spec = importlib.util.spec_from_file_location('_vit_jax_sweep_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'{path}: a sweep file defines get_sweep() returning a vit_jax.sweep.Sweep.')
  sweep = module.get_sweep()
  if not isinstance(sweep, Sweep):
    raise ValueError(f'{path}: get_sweep() returned {type(sweep).__name__}, not a Sweep.')
  return sweep


_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]')


def value_label(value) -> str:
  """0.75 -> '0.75', 'ViT-S/16' -> 'ViT-S_16', (0.2, 1.0) -> '0.2_1.0': filesystem-safe."""
  if isinstance(value, (list, tuple)):
    return '_'.join(value_label(v) for v in value)
  if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
    value = int(value) if not isinstance(value, bool) else value
  return _UNSAFE.sub('_', str(value))


def key_labels(keys: Iterable[str]) -> dict:
  """Short, unambiguous names of swept keys: the last part of the dotted key
  ('model.mask_ratio' -> 'mask_ratio'), the full key where two keys share it."""
  keys = list(dict.fromkeys(keys))
  last = [k.split('.')[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def member_name(values: dict, labels: dict) -> str:
  if not values:
    return 'base'
  return ','.join(f'{labels[k]}={value_label(v)}' for k, v in values.items())


def expand(sweep: Sweep, root: str) -> list[Member]:
  """Every member of the sweep, parents before children, with names and overrides."""
  names = [s.name for s in sweep.stages]
  if len(set(names)) != len(names):
    raise ValueError(f'Stage names must differ: {names}.')
  labels = key_labels(k for s in sweep.stages for m in s.grid for k in m)
  members: dict[str, list[Member]] = {}
  for stage in sweep.stages:
    if not _UNSAFE.sub('', stage.name) == stage.name or not stage.name:
      raise ValueError(f'Stage name {stage.name!r}: use letters, digits, ".", "_", "-".')
    if stage.init_from and stage.init_from not in members:
      where = ('comes after it' if stage.init_from in names
               else f'is not a stage of this sweep (stages: {names})')
      raise ValueError(f"Stage {stage.name!r}: init_from={stage.init_from!r} {where}.")
    parents = members[stage.init_from] if stage.init_from else [None]
    grid = stage.grid or [{}]
    stage_members = []
    for parent in parents:
      for point in grid:
        values = {**(parent.values if parent else {}), **point}
        overrides = {**stage.overrides, **point}
        if parent:
          overrides |= {k: parent.values[k] for k in stage.inherit
                        if k in parent.values and k not in point}
          overrides['init.path'] = parent.workdir
        name = member_name(values, labels)
        stage_members.append(Member(stage, name, os.path.join(root, stage.name, name),
                                    values, overrides, parent))
    seen = [m.name for m in stage_members]
    if len(set(seen)) != len(seen):
      raise ValueError(f'Stage {stage.name!r}: two members have the same values ({seen}).')
    members[stage.name] = stage_members
  return [m for stage in sweep.stages for m in members[stage.name]]


# ------------------------------------------------------- configs of members, checked


def load_config(spec: str):
  """'configs/FILE.py:ARG' -> the locked ConfigDict that vit_jax.main would build."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config {spec!r}: no such file {path!r}.')
  from vit_jax import config_utils  # pylint: disable=import-outside-toplevel
  config = config_utils.load_config_file(path, arg)
  config.lock()
  return config


def member_config(member: Member):
  """The member's config with its overrides applied, as its command line would; a
  ValueError names a key the config does not have or a value of the wrong type."""
  config = load_config(member.stage.config)
  for key, value in member.overrides.items():
    *parents, leaf = key.split('.')
    node = config
    try:
      for part in parents:
        node = node[part]
      if leaf not in node:
        if parents != ['model']:
          raise KeyError(leaf)
        # As on the command line: config.model takes any field, get_model checks it.
        with node.unlocked():
          node[leaf] = value
        continue
      node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], tuple) else value
    except (KeyError, AttributeError):
      raise ValueError(f'Stage {member.stage.name!r}: {key!r} is not a key of '
                       f'{member.stage.config} (check the spelling in the sweep file).') from None
    except TypeError as e:
      raise ValueError(f'Stage {member.stage.name!r}: {key}={value!r} does not fit '
                       f'{member.stage.config} ({e}).') from None
  return config


def total_steps(config) -> int:
  from vit_jax import data, train  # pylint: disable=import-outside-toplevel
  size = data.dataset_info(config.data).split_size(config.data.train_split)
  return train.num_train_steps(config, size)[0]


def check(members: list[Member]) -> dict:
  """Builds every member's config (errors before anything runs); {label: total steps}."""
  from vit_jax import data  # pylint: disable=import-outside-toplevel
  steps = {}
  for member in members:
    config = member_config(member)
    data.ensure_prepared(config.data)
    steps[member.label] = total_steps(config)
  return steps


# ----------------------------------------------------------------------- running


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


def _error_line(log_path: str) -> str:
  with open(log_path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
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


class _Stop(Exception):
  pass


def run_member(member: Member) -> tuple[bool, str]:
  """Runs (or resumes) one member; returns (ok, message). Its output goes to log.txt."""
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
                             'machine': machine()})
  with open(os.path.join(member.workdir, RECORD), 'w') as f:
    json.dump(record, f, indent=1)
  if stopping or returncode < 0:
    raise _Stop()
  if returncode:
    return False, f'{_error_line(log_path)} (exit {returncode}; log: {log_path})'
  return True, f'{seconds / 60:.1f} min'


def run(members: list[Member], steps: dict, log=print) -> list[str]:
  """Runs every unfinished member whose parent finished; returns the failures."""
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
    ok, message = run_member(member)
    if ok and not is_finished(member.workdir, steps[member.label]):
      ok, message = False, f'exited without evaluating its last step (log: {member.workdir}/log.txt)'
    if not ok:
      failed[member.label] = message
    log(f'{head}: {"done in " if ok else "FAILED: "}{message}')
  return [f'{label}: {message}' for label, message in failed.items()]


# ------------------------------------------------------------------------ results


def summarize(member: Member, steps: int) -> dict:
  """One row of results: the member's swept values and final numbers."""
  rows = read_metrics(member.workdir)
  train_rows = [r for r in rows if 'train/loss' in r]
  eval_rows = [r for r in rows if any(k.startswith('eval/') for k in r)]
  row = {'stage': member.stage.name, 'name': member.name, **member.values}
  done = bool(eval_rows) and eval_rows[-1]['step'] == steps
  attempts = _record(member.workdir)['attempts']
  if done:
    row['status'] = 'done'
  elif attempts and attempts[-1].get('returncode'):
    row['status'] = 'failed'
  else:
    row['status'] = 'unfinished' if rows else 'not started'
  row['steps'] = max((r['step'] for r in rows), default=0)
  row['total_steps'] = steps
  if train_rows:
    row['final_train_loss'] = train_rows[-1]['train/loss']
  if eval_rows:
    last = eval_rows[-1]
    for key, value in last.items():
      if key.startswith('eval/') and not key.endswith('count'):
        row[f'last_{key}'] = value
        values = [r[key] for r in eval_rows if key in r]
        row[f'best_{key}'] = max(values) if 'top' in key else min(values)
  flops = [r['perf/flops_per_step'] for r in train_rows if 'perf/flops_per_step' in r]
  if flops:
    row['train_flops'] = flops[-1] * row['steps']
  previous, seconds = 0, 0.0
  for r in train_rows:
    if 'perf/step_time' in r:
      seconds += r['perf/step_time'] * (r['step'] - previous)
    previous = r['step']
  rates = [r['perf/images_per_sec'] for r in train_rows if 'perf/images_per_sec' in r]
  if rates:
    row['train_seconds'] = seconds
    row['images_per_sec'] = float(np.median(rates))
  if attempts and done:  # a finished run's record no longer changes
    row['wall_clock_s'] = sum(a['seconds'] for a in attempts)
  return row


def main_metric(rows: list[dict]) -> str:
  """The metric a stage is compared on: top-1 where there is one, else the eval loss."""
  keys = {k for r in rows for k in r}
  return 'last_eval/top1' if 'last_eval/top1' in keys else 'last_eval/loss'


def aggregate_seeds(rows: list[dict], swept: list[str]) -> list[dict]:
  """Mean and standard deviation over seeds of the numeric results, per stage and values."""
  groups: dict[tuple, list[dict]] = {}
  keys = [k for k in swept if k != 'seed']
  for r in rows:
    groups.setdefault((r['stage'],) + tuple(str(r.get(k)) for k in keys), []).append(r)
  out = []
  for group in groups.values():
    done = [r for r in group if r['status'] == 'done']
    agg = {'stage': group[0]['stage'], **{k: group[0].get(k) for k in keys},
           'seeds': len(done)}
    for metric in ('last_eval/top1', 'best_eval/top1', 'last_eval/loss', 'final_train_loss'):
      values = [r[metric] for r in done if metric in r]
      if values:
        agg[f'{metric} mean'] = float(np.mean(values))
        agg[f'{metric} std'] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    out.append(agg)
  return out


def fit_power_law(compute, loss) -> dict:
  """loss = a * compute**exponent, least squares in log-log space: {a, exponent, r2}."""
  x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
  if len(x) < 2:
    raise ValueError('A power-law fit needs at least two points.')
  exponent, intercept = np.polyfit(x, y, 1)
  residual = y - (exponent * x + intercept)
  total = np.sum((y - y.mean()) ** 2)
  r2 = 1.0 - np.sum(residual ** 2) / total if total > 0 else 1.0
  return {'a': float(np.exp(intercept)), 'exponent': float(exponent), 'r2': float(r2)}


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The compute-efficient frontier: points with a lower loss than every cheaper point."""
  best, out = math.inf, []
  for compute, loss in sorted(points):
    if loss < best:
      best = loss
      out.append((compute, loss))
  return out


def _fmt(value) -> str:
  if isinstance(value, float):
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
      return f'{value:.3g}'
    return f'{value:.4f}'
  return '' if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(_fmt(r.get(c)) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def report(sweep: Sweep, members: list[Member], steps: dict, root: str,
           command: str = '') -> dict:
  """Writes results.csv, results.md and the PNG plots; returns what it wrote."""
  rows = [summarize(m, steps[m.label]) for m in members]
  swept = list(dict.fromkeys(k for m in members for k in m.values))
  result_keys = list(dict.fromkeys(
      k for r in rows for k in r if k not in swept and k not in ('stage', 'name')))
  columns = ['stage', 'name', *swept, *result_keys]
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)

  lines = [f'# {sweep.title or os.path.basename(os.path.normpath(root))}', '']
  if command:
    lines += ['Command (rerun it to continue or to rebuild this page):', '', '```',
              command, '```', '']
  done = sum(r['status'] == 'done' for r in rows)
  lines += [f'{done} of {len(rows)} runs finished.', '']
  records = [a for m in members for a in _record(m.workdir)['attempts']]
  machines = sorted({a['machine'] for a in records if 'machine' in a})
  if done:
    hours = sum(r.get('wall_clock_s', 0.0) for r in rows) / 3600
    lines += [f'Wall-clock of the finished runs: {hours:.2f} h, one run after another, on '
              f'{"; ".join(machines) or "a machine not recorded"}.', '']
  plots = []
  for stage in sweep.stages:
    stage_rows = [r for r in rows if r['stage'] == stage.name]
    metric = main_metric(stage_rows)
    shown = [c for c in columns if c not in ('stage',) and any(c in r for r in stage_rows)
             and (c in swept or c in ('status', 'steps', 'final_train_loss', 'train_flops',
                                      'train_seconds', 'wall_clock_s', 'images_per_sec')
                  or c.startswith(('last_eval/', 'best_eval/')))]
    lines += [f'## {stage.name} (`{stage.config}`)', '', markdown_table(stage_rows, shown), '']
    stage_swept = [k for k in swept if any(k in r for r in stage_rows)]
    if 'seed' in stage_swept:
      agg = aggregate_seeds(stage_rows, stage_swept)
      agg_columns = list(dict.fromkeys(k for a in agg for k in a if k != 'stage'))
      lines += ['Mean and standard deviation over seeds:', '', markdown_table(agg, agg_columns), '']
    for key in stage_swept:
      if key != 'seed' and len({str(r.get(key)) for r in stage_rows}) > 1:
        path = plot_metric(stage_rows, key, metric, os.path.join(
            root, f'{stage.name}_{key_labels([key])[key]}.png'), stage.name)
        if path:
          plots.append(path)
          lines += [f'![{stage.name}: {metric} against {key}]({os.path.basename(path)})', '']
  fits = {}
  if sweep.scaling:
    for stage in sweep.stages:
      stage_rows = [r for r in rows if r['stage'] == stage.name and r['status'] == 'done'
                    and 'train_flops' in r and 'last_eval/loss' in r]
      if len(stage_rows) >= 2:
        path = os.path.join(root, f'{stage.name}_scaling.png')
        fits[stage.name] = plot_scaling(stage_rows, sweep.scaling, path, stage.name)
        plots.append(path)
        fit = fits[stage.name]
        lines += [f'Scaling ({stage.name}): on the compute-efficient frontier, eval loss = '
                  f'{fit["a"]:.3g} x C^{fit["exponent"]:.3f} (C in FLOPs), R\u00b2 = '
                  f'{fit["r2"]:.3f}, from {fit["points"]} points.', '',
                  f'![{stage.name}: eval loss against training compute]'
                  f'({os.path.basename(path)})', '']
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write('\n'.join(lines))
  return {'rows': rows, 'fits': fits, 'plots': plots}


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_metric(rows: list[dict], key: str, metric: str, path: str, title: str) -> str:
  """The metric against one swept key (mean and spread over the other keys); '' if the
  key's values are not numbers."""
  points = [(r[key], r[metric]) for r in rows if metric in r and key in r]
  if not points or not all(isinstance(x, (int, float)) for x, _ in points):
    return ''
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
  xs = sorted({x for x, _ in points})
  groups = [[y for x2, y in points if x2 == x] for x in xs]
  ax.plot([x for x, _ in points], [y for _, y in points], 'o', color='0.6', ms=4)
  ax.plot(xs, [np.mean(g) for g in groups], '-o', color='C0')
  ax.set_xlabel(key)
  ax.set_ylabel(metric.replace('last_', ''))
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_scaling(rows: list[dict], size_key: str, path: str, title: str) -> dict:
  """Eval loss against training FLOPs, log-log: one curve per model size, the frontier
  and the power law fitted to it. Returns the fit."""
  plt = _pyplot()
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
  sizes = sorted({r[size_key] for r in rows})
  for i, size in enumerate(sizes):
    curve = sorted((r['train_flops'], r['last_eval/loss']) for r in rows if r[size_key] == size)
    ax.plot(*zip(*curve), '-o', color=f'C{i}', label=f'{size_key.split(".")[-1]}={size}')
  edge = frontier([(r['train_flops'], r['last_eval/loss']) for r in rows])
  fit = fit_power_law(*zip(*edge)) if len(edge) >= 2 else {'a': math.nan, 'exponent': math.nan,
                                                           'r2': math.nan}
  fit['points'] = len(edge)
  ax.plot(*zip(*edge), 's', mfc='none', color='k', ms=9, label='frontier')
  if len(edge) >= 2:
    c = np.geomspace(min(x for x, _ in edge), max(x for x, _ in edge), 50)
    ax.plot(c, fit['a'] * c ** fit['exponent'], '--', color='k',
            label=f'{fit["a"]:.3g} C^{fit["exponent"]:.3f} (R\u00b2 {fit["r2"]:.2f})')
  ax.set_xscale('log')
  ax.set_yscale('log')
  # Losses span less than a decade: label the y ticks as plain numbers, and only the
  # x axis's powers of ten.
  ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%.2g'))
  ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter('%.2g'))
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel('training compute (FLOPs)')
  ax.set_ylabel('eval loss')
  ax.set_title(title)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return fit


# ------------------------------------------------------------- cluster launch lines


def launch_lines(members: list[Member]) -> str:
  """A SLURM script (one job array per stage, each after the previous stage succeeded)
  and the TPU-VM lines (one run after another on every worker), in dependency order."""
  stages = list(dict.fromkeys(m.stage.name for m in members))
  out = ['#!/usr/bin/env bash',
         '# SLURM: run this on the login node. One job array per stage; a stage starts when',
         '# the previous one succeeded. Add your #SBATCH lines (partition, GPUs, time).',
         'set -euo pipefail', 'previous=""']
  for stage in stages:
    stage_members = [m for m in members if m.stage.name == stage]
    out += ['previous=$(sbatch --parsable ${previous:+--dependency=afterok:$previous} <<\'EOF\'',
            '#!/usr/bin/env bash', f'#SBATCH --job-name={stage}',
            f'#SBATCH --array=0-{len(stage_members) - 1}', 'case $SLURM_ARRAY_TASK_ID in']
    out += [f'  {i}) srun {shlex.join(m.command())} ;;' for i, m in enumerate(stage_members)]
    out += ['esac', 'EOF', ')', f'echo "{stage}: job $previous"']
  out += ['', '# TPU VM (a pod slice): each run on all workers at once, one run after another.',
          '# Set TPU_NAME and ZONE; the workdir must be one every worker sees.']
  for m in members:
    out.append('gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all '
               f'--command={shlex.quote("cd vit_jax && " + shlex.join(m.command()))}')
  return '\n'.join(out)


# -------------------------------------------------------------------- command line


def main(argv) -> int:
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  sweep_path, root = flags.FLAGS.sweep, flags.FLAGS.workdir
  sweep = load_sweep(sweep_path)
  members = expand(sweep, root)
  command = shlex.join(['python', '-m', 'vit_jax.sweep', f'--sweep={sweep_path}',
                        f'--workdir={root}'])
  if flags.FLAGS.launch == 'print':
    for member in members:  # the keys, without the dataset (it is on the cluster)
      member_config(member)
    print(launch_lines(members))
    return 0
  steps = check(members)  # every member's config, before anything runs
  failures = []
  if not flags.FLAGS.report:
    print(f'Sweep {sweep_path}: {len(members)} runs in {root}.', flush=True)
    try:
      failures = run(members, steps, log=lambda line: print(line, flush=True))
    except _Stop:
      print('Stopped; the interrupted run saved its last checkpoint. Run the same command '
            'to continue.', flush=True)
      return 1
  written = report(sweep, members, steps, root, command)
  print(f'Results: {os.path.join(root, "results.md")}, {os.path.join(root, "results.csv")}'
        + (f', {len(written["plots"])} plots' if written['plots'] else ''))
  for name, fit in written['fits'].items():
    print(f'{name}: eval loss = {fit["a"]:.3g} C^{fit["exponent"]:.3f}, R2 {fit["r2"]:.3f}')
  if failures:
    print(f'{len(failures)} run(s) failed:\n  ' + '\n  '.join(failures), file=sys.stderr)
    return 1
  return 0


def cli():
  """Console entry point (vit-jax-sweep)."""
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('sweep', None, 'Sweep file (configs/sweeps/NAME.py).')
  flags.DEFINE_string('workdir', None, 'Root of the members\' workdirs and the results.')
  flags.DEFINE_enum('launch', 'local', ['local', 'print'],
                    'local: run the members here, one after another; print: print SLURM '
                    'and TPU-VM commands instead.')
  flags.DEFINE_bool('report', False, 'Only write results.csv/.md and plots from the workdirs.')
  flags.mark_flags_as_required(['sweep', 'workdir'])

  def checked_main(argv):
    logging.set_verbosity(logging.WARNING)
    try:
      sys.exit(main(argv))
    except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: a missing dataset
      print(f'Error: {e}', file=sys.stderr)
      sys.exit(1)

  app.run(checked_main)


if __name__ == '__main__':
  # Sweep files import vit_jax.sweep: run that module, not a second copy named __main__.
  from vit_jax import sweep as _module  # pylint: disable=import-self
  _module.cli()
