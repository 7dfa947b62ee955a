r"""Accuracy against training hours of an MAE pretraining and the fine-tunings started from it.

  python scripts/headline_curve.py --pretrain=runs/mae_vs_scratch/pretrain/base \
      --checkpoints=docs/results/headline/pretraining_checkpoints.json \
      --finetune=runs/mae_vs_scratch/finetune/seed=0 --target=0.94 \
      --output_dir=docs/results/headline

Pretraining: the k-NN and few-shot accuracy of its kept checkpoints
(scripts/eval_checkpoints.py's JSON) at the training hours up to each. Fine-tuning: each
run's eval/top1 at its evaluations, at its own hours plus the pretraining's up to the
checkpoint it started from (its init.path). Hours are training (metrics.training_seconds:
step time times steps, without compiles and evaluations). Writes curve.png and
curve.json (every point, the best top-1 and the hours it took) into --output_dir.

Where the finished fine-tunings have two or more budgets (config num_epochs, e.g. the
20- and 40-epoch stages of mae_vs_scratch), the final top-1 of each budget's runs is
averaged and fitted as a + b log2(epochs): b is the gain of a doubling, and the fit at
twice the largest budget is what another doubling would give if the gains do not shrink
(they usually do, so it is an upper estimate). Give only finished runs.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax import metrics  # noqa: E402
from vit_jax.sweep.fits import doubling  # noqa: E402

_PRETRAIN = flags.DEFINE_string('pretrain', None, 'Workdir of the MAE pretraining.')
_CHECKPOINTS = flags.DEFINE_string('checkpoints', '', 'scripts/eval_checkpoints.py output of '
                                   'the pretraining (optional).')
_FINETUNE = flags.DEFINE_list('finetune', [], 'Workdirs of fine-tunings of the pretraining.')
_TARGET = flags.DEFINE_float('target', 0.94, 'Top-1 drawn as a line.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Where curve.png and curve.json go.')
flags.mark_flags_as_required(['pretrain', 'output_dir'])


def eval_curve(workdir: str, offset_hours: float = 0.0) -> list[dict]:
  """[{step, hours, top1}] at each evaluation of a run, hours from `offset_hours`."""
  rows = metrics.read_metrics(workdir)
  logged = metrics.training_seconds(rows)
  return [{'step': r['step'], 'top1': r['eval/top1'],
           'hours': offset_hours + metrics.seconds_at(logged, r['step']) / 3600}
          for r in rows if 'eval/top1' in r]


def start_hours(finetune: str, pretrain_logged: list) -> float:
  """Pretraining hours before a fine-tuning: up to the step folder its init.path names
  (.../checkpoints/STEP), else the whole pretraining."""
  with open(os.path.join(finetune, 'config.json')) as f:
    init_path = os.path.normpath(json.load(f).get('init', {}).get('path', ''))
  step = os.path.basename(init_path)
  if step.isdigit() and os.path.basename(os.path.dirname(init_path)) == 'checkpoints':
    return metrics.seconds_at(pretrain_logged, int(step)) / 3600
  return pretrain_logged[-1][1] / 3600


def run_epochs(workdir: str) -> float | None:
  with open(os.path.join(workdir, 'config.json')) as f:
    epochs = json.load(f).get('num_epochs')
  return float(epochs) if epochs else None


def main(argv):
  del argv
  pretrain_logged = metrics.training_seconds(metrics.read_metrics(_PRETRAIN.value))
  if len(pretrain_logged) < 2:
    raise app.UsageError(f'{_PRETRAIN.value}/metrics.jsonl has no training rows: give the '
                         'workdir of the pretraining run.')
  pretrain_hours = pretrain_logged[-1][1] / 3600
  checkpoints, knn_k = [], None
  if _CHECKPOINTS.value:
    with open(_CHECKPOINTS.value) as f:
      probed = json.load(f)
    checkpoints, knn_k = probed['rows'], probed.get('knn_k')
  runs = {path: eval_curve(path, start_hours(path, pretrain_logged))
          for path in _FINETUNE.value}
  finals = {}
  for path, curve in runs.items():
    epochs = run_epochs(path)
    if curve and epochs:
      finals.setdefault(epochs, []).append(curve[-1]['top1'])
  trend = doubling(finals)
  points = [p for curve in runs.values() for p in curve]
  best = max(points, key=lambda p: p['top1'], default=None)
  summary = {'pretrain': _PRETRAIN.value, 'pretrain_hours': pretrain_hours,
             'target': _TARGET.value, 'checkpoints': checkpoints, 'finetune': runs,
             'best': best and {**best, 'run': next(k for k, v in runs.items() if best in v)},
             'reached_target': bool(best and best['top1'] >= _TARGET.value),
             'doubling': trend}
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  with open(os.path.join(_OUTPUT_DIR.value, 'curve.json'), 'w') as f:
    json.dump(summary, f, indent=1)

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  for key, style, label in (('eval/knn_top1', 'o-', f'pretraining: {knn_k}-NN top-1'),
                            ('eval/fewshot_10shot', 's--', 'pretraining: 10-shot linear')):
    curve = [(c['train_hours'], c[key]) for c in checkpoints if key in c]
    if curve:
      ax.plot(*zip(*curve), style, color='0.45', ms=4, label=label)
  for i, (path, curve) in enumerate(runs.items()):
    name = '/'.join(os.path.normpath(path).split(os.sep)[-2:])  # e.g. finetune/seed=0
    if curve:
      ax.plot([p['hours'] for p in curve], [p['top1'] for p in curve], '-', color=f'C{i}',
              label=f'fine-tuning: top-1 ({name})')
  ax.axvline(pretrain_hours, color='0.7', lw=0.8)
  ax.axhline(_TARGET.value, color='C3', ls=':', lw=1, label=f'target {_TARGET.value:.1%}')
  if trend:
    ax.set_title(f'fine-tuning: {100 * trend["gain_per_doubling"]:+.2f} points a doubling of '
                 'its epochs; '
                 f'{trend["next_epochs"]:g} epochs: about {trend["projected_top1"]:.1%}',
                 fontsize=8)
  ax.set_xlabel('training hours (training steps only)')
  ax.set_ylabel('accuracy on the evaluation split')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='lower right')
  fig.tight_layout()
  fig.savefig(os.path.join(_OUTPUT_DIR.value, 'curve.png'))
  if best:
    print(f'Best top-1 {best["top1"]:.2%} at {best["hours"]:.2f} h '
          f'({pretrain_hours:.2f} h of pretraining); target {_TARGET.value:.1%} '
          f'{"reached" if summary["reached_target"] else "not reached"}.')
  if trend:
    means = ', '.join(f'{b["epochs"]:g} epochs {b["mean_top1"]:.2%} ({b["runs"]} runs)'
                      for b in trend['budgets'])
    print(f'Final top-1 by fine-tuning budget: {means}; {100 * trend["gain_per_doubling"]:+.2f} '
          f'points a doubling, so {trend["next_epochs"]:g} epochs would give about '
          f'{trend["projected_top1"]:.2%} if the gains do not shrink.')


if __name__ == '__main__':
  app.run(main)
