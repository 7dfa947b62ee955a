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
