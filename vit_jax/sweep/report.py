"""A sweep's results: one row per member (results.csv), tables with the mean and spread
over seeds, plots and fits (results.md)."""

import csv
import os

import numpy as np

from vit_jax import metrics
from vit_jax.sweep.grid import Member, Sweep, key_labels, member_config
from vit_jax.sweep.plots import plot_metric, plot_scaling
from vit_jax.sweep.runner import (SHARED_SLOWDOWN, _record, alone_for, old_steps_alone,
                                  read_metrics, read_steps_alone, shared_machine)
from vit_jax.sweep.verdicts import judge


def summarize(member: Member, steps: int, alone: float | None = None) -> dict:
  """One row of results: the member's swept values and final numbers; with `alone` (the
  images/s of its steps alone on the machine, back to back), whether it ran on a shared
  machine."""
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
  seconds = metrics.training_seconds(train_rows)[-1][1]
  rates = [r['perf/images_per_sec'] for r in train_rows if 'perf/images_per_sec' in r]
  if rates:
    row['train_seconds'] = seconds
    row['images_per_sec'] = float(np.median(rates))
  if attempts and done:  # a finished run's record no longer changes
    row['wall_clock_s'] = sum(a['seconds'] for a in attempts)
  if alone and rates:
    row['images_per_sec_alone'] = alone
    row['shared_machine'] = 'yes' if shared_machine(row['images_per_sec'], alone) else 'no'
  return row


def main_metric(rows: list[dict]) -> str:
  """The metric a stage is compared on: top-1 where there is one, else the eval loss."""
  keys = {k for r in rows for k in r}
  return 'last_eval/top1' if 'last_eval/top1' in keys else 'last_eval/loss'


def fill_base_values(rows: list[dict], members: list[Member]) -> None:
  """Writes into each stage's base runs (those that sweep nothing but the seed) the values
  their config gives the keys the stage's other runs sweep, so that a one-factor-at-a-time
  grid's table shows the base run's learning rate and its plots include the base point."""
  for row, member in zip(rows, members):
    if any(k != 'seed' for k in member.values):
      continue
    swept = {k for m in members if m.stage.name == member.stage.name for k in m.values}
    config = None
    for key in sorted(swept - set(member.values) - {'seed'}):
      config = config or member_config(member)
      node = config
      for part in key.split('.'):
        node = node[part] if part in node else None
        if node is None:
          break
      if isinstance(node, (int, float, str, bool)):
        row[key] = node


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
    names = ['last_eval/top1', 'best_eval/top1', 'last_eval/loss', 'final_train_loss']
    names += sorted({k for r in done for k in r if k.startswith('last_eval/')} - set(names))
    for metric in names:
      values = [r[metric] for r in done if metric in r]
      if values:
        agg[f'{metric} mean'] = float(np.mean(values))
        # One run has no spread: left blank rather than written as 0.
        agg[f'{metric} std'] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    out.append(agg)
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
  alone = read_steps_alone(root)
  rows = [summarize(m, steps[m.label], alone_for(m, alone)) for m in members]
  fill_base_values(rows, members)
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
  shared = [r['name'] for r in rows if r.get('shared_machine') == 'yes']
  if shared:
    lines += [f'**Ran on a shared machine** (median images/s more than '
              f'{SHARED_SLOWDOWN:.0%} below the same steps alone back to back, '
              'images_per_sec_alone): '
              f'{", ".join(shared)}. Their times are not this machine\'s; rerun them alone.', '']
  old = old_steps_alone(root)
  if old:
    lines += [f'{old} steps of step_alone.json were timed by an older version (one step at a '
              'time) and are not compared: run the sweep\'s command without --report, with '
              'nothing else running, to time them back to back.', '']
  if done:
    hours = sum(r.get('wall_clock_s', 0.0) for r in rows) / 3600
    lines += [f'Wall-clock of the finished runs: {hours:.2f} h, one run after another, on '
              f'{"; ".join(machines) or "a machine not recorded"}.', '']
  verdicts = [judge(claim, rows) for claim in sweep.claims]
  if verdicts:
    lines += ['## Verdicts', '', 'Each claim compares the mean of two groups of finished runs '
              '(\u00b1 their standard deviation over seeds); the interval is the 95% Welch '
              'interval of the difference (vit_jax/sweep/verdicts.py).', '']
    lines += [f'- {v["line"]}' for v in verdicts] + ['']
  plots = []
  for stage in sweep.stages:
    stage_rows = [r for r in rows if r['stage'] == stage.name]
    metric = main_metric(stage_rows)
    shown = [c for c in columns if c not in ('stage',) and any(c in r for r in stage_rows)
             and (c in swept or c in ('status', 'steps', 'final_train_loss', 'train_flops',
                                      'train_seconds', 'wall_clock_s', 'images_per_sec',
                                      'images_per_sec_alone', 'shared_machine')
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
        point_keys = [k for k in swept if k != 'seed' and any(k in r for r in stage_rows)]
        fewshot = sorted({k for r in stage_rows for k in r if k.startswith('last_eval/fewshot_')},
                         key=lambda k: (k != 'last_eval/fewshot_5shot', k))
        fits[stage.name] = plot_scaling(stage_rows, sweep.scaling, path, stage.name,
                                        point_keys, fewshot[0] if fewshot else '')
        plots.append(path)
        fit = fits[stage.name]
        lines += [f'Scaling ({stage.name}): on the compute-efficient frontier, eval loss = '
                  f'{fit["a"]:.3g} x C^{fit["exponent"]:.3f} (C in FLOPs), R\u00b2 = '
                  f'{fit["r2"]:.3f}, from {fit["points"]} points.', '',
                  f'![{stage.name}: eval loss against training compute]'
                  f'({os.path.basename(path)})', '']
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write('\n'.join(lines))
  return {'rows': rows, 'fits': fits, 'plots': plots, 'verdicts': verdicts}
