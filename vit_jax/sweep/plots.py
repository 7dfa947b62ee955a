"""The figures of a sweep's report (matplotlib, no display): a metric against a swept
value, and eval loss against training compute with the frontier's power law."""

import math

import numpy as np

from vit_jax.sweep.fits import fit_power_law, frontier


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_metric(rows: list[dict], key: str, metric: str, path: str, title: str) -> str:
  """The metric against one swept key: every run (grey) and, per value, the mean with the
  standard deviation over the runs that share it (seeds) as an error bar; '' if the key's
  values are not numbers."""
  points = [(r[key], r[metric]) for r in rows if metric in r and key in r]
  if not points or not all(isinstance(x, (int, float)) for x, _ in points):
    return ''
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
  xs = sorted({x for x, _ in points})
  groups = [[y for x2, y in points if x2 == x] for x in xs]
  ax.plot([x for x, _ in points], [y for _, y in points], 'o', color='0.6', ms=4)
  ax.errorbar(xs, [np.mean(g) for g in groups], yerr=[_std(g) for g in groups], fmt='-o',
              color='C0', capsize=3)
  if xs[0] > 0 and xs[-1] / xs[0] >= 8:  # learning rates and the like: equal ratios apart
    ax.set_xscale('log')
    ax.set_xticks(xs, [f'{x:g}' for x in xs])
    ax.minorticks_off()
  ax.set_xlabel(key)
  ax.set_ylabel(metric.replace('last_', ''))
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _std(values) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _mean_points(rows: list[dict], size_key: str, metric: str, point_keys) -> dict:
  """{size: [(compute, mean, std, runs)]}: the runs of one point (equal values of
  `point_keys`: the swept keys but the seed) pooled at their mean compute, by compute."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    if metric in r:
      groups.setdefault(tuple(str(r.get(k)) for k in point_keys), []).append(r)
  curves: dict = {}
  for group in groups.values():
    values = [g[metric] for g in group]
    compute = float(np.mean([g['train_flops'] for g in group]))
    curves.setdefault(group[0][size_key], []).append(
        (compute, float(np.mean(values)), _std(values), len(values)))
  return {size: sorted(points) for size, points in sorted(curves.items())}


def _draw_curves(ax, curves: dict, colours: dict, label: str) -> None:
  """One line per size through its points' means, their standard deviation as error bars."""
  for size, points in curves.items():
    xs, means, stds, _ = zip(*points)
    ax.errorbar(xs, means, yerr=stds, fmt='-o', color=colours.get(size, 'k'), capsize=3,
                label=f'{label}={size}')


def plot_scaling(rows: list[dict], size_key: str, path: str, title: str,
                 point_keys=(), fewshot: str = '') -> dict:
  """Eval loss against training FLOPs, log-log: one curve per model size (seeds of a point
  averaged, their standard deviation as error bars; a point is a value of each key of
  `point_keys`, default every run its own point), the frontier of the means and the
  power law fitted to it. With `fewshot` (a metric such as 'last_eval/fewshot_5shot') a
  second panel draws it against the same compute. Returns the fit."""
  plt = _pyplot()
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  panels = 2 if fewshot and any(fewshot in r for r in rows) else 1
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), dpi=120, squeeze=False)
  ax = axes[0][0]
  curves = _mean_points(rows, size_key, 'last_eval/loss', point_keys or ('name',))
  colours = {size: f'C{i}' for i, size in enumerate(curves)}  # the same in both panels
  _draw_curves(ax, curves, colours, size_key.split('.')[-1])
  edge = frontier([(x, m) for points in curves.values() for x, m, _, _ in points])
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
  if panels == 2:
    ax = axes[0][1]
    _draw_curves(ax, _mean_points(rows, size_key, fewshot, point_keys or ('name',)), colours,
                 size_key.split('.')[-1])
    ax.set_xscale('log')
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel('training compute (FLOPs)')
    ax.set_ylabel(fewshot.replace('last_', ''))
    ax.set_title(f'{title}: few-shot linear accuracy')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return fit
