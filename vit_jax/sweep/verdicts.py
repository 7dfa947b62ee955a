"""A paper's claim tested on a sweep's runs: reproduced, not reproduced or inconclusive.

A claim compares two groups of finished runs, each one stage's members with given swept
values, pooled over their seeds, on one metric (the difference of the means, a - b):

  'greater' (a beats b): reproduced when the difference's 95% confidence interval lies
      above zero, not reproduced when it lies at or below zero, else inconclusive;
  'within' (a and b differ by less than `margin`, e.g. doubling a budget moves top-1
      less than half a point): reproduced when the whole interval lies inside
      (-margin, margin), not reproduced when it lies wholly outside, else inconclusive;
  'at_most' (a exceeds b by less than `margin`; a budget has flattened when twice it
      gains less than half a point, a loss on doubling counting as flat): reproduced when
      the interval's upper end lies below margin, not reproduced when its lower end lies
      at or above it, else inconclusive.

The interval is Welch's: the difference +- t * sqrt(var_a / n_a + var_b / n_b), t the
two-sided 95% quantile of Student's t with the Welch-Satterthwaite degrees of freedom
(t = 2.78 for two groups of three seeds with equal spread, not the normal 1.96). A group
of one run has no spread of its own: it borrows the other group's, with that group's
n - 1 degrees of freedom (t = 4.30 for three seeds against one run; the line says so);
two single runs give no interval, so their claim is inconclusive.
"""

import dataclasses
import math

import numpy as np

PERCENT_METRICS = ('top1', 'fewshot', 'knn')  # fractions shown as percentages and points


@dataclasses.dataclass(frozen=True)
class Group:
  """The finished runs of one stage whose swept values include `values` (seeds pooled)."""
  stage: str
  values: dict = dataclasses.field(default_factory=dict)

  def label(self) -> str:
    spelled = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in self.values.items())
    return f'{self.stage} ({spelled})' if spelled else self.stage

  def matches(self, values: dict) -> bool:
    """Whether a run with these swept values belongs to the group (2 and 2.0 are equal)."""
    return all(k in values and values_equal(values[k], v) for k, v in self.values.items())

  def select(self, rows: list[dict], metric: str) -> list[float]:
    return [float(r[metric]) for r in rows
            if r['stage'] == self.stage and r.get('status') == 'done' and metric in r
            and self.matches(r)]


def values_equal(a, b) -> bool:
  """Swept values compared as a sweep file means them: 2 == 2.0, (0.2, 1) == [0.2, 1.0]."""
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
  return str(a) == str(b)


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim of a paper, or of convergence, as a comparison of two groups of runs.

  Attributes:
    text: the claim in words, with its source ('MAE pretraining beats training from
      scratch (He et al. 2022, Table 3)').
    a, b: the groups compared; the difference is a - b.
    kind: 'greater' (a > b), 'within' (|a - b| < margin) or 'at_most' (a - b < margin).
    margin: for 'within' and 'at_most', in the metric's units (0.005 is half a point of
      top-1).
    metric: a column of the results ('last_eval/top1', 'last_eval/fewshot_5shot', ...).
  """
  text: str
  a: Group
  b: Group
  kind: str = 'greater'
  margin: float = 0.0
  metric: str = 'last_eval/top1'

  def __post_init__(self):
    if self.kind not in ('greater', 'within', 'at_most'):
      raise ValueError(f"Claim {self.text!r}: kind={self.kind!r} is not 'greater', 'within' "
                       "or 'at_most'.")
    if self.kind != 'greater' and self.margin <= 0:
      raise ValueError(f"Claim {self.text!r}: kind={self.kind!r} needs a margin > 0.")


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, str]:
  """(difference of means a - b, half-width of its 95% interval, note). The half-width
  is nan when neither group has two runs."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  diff = float(np.mean(a) - np.mean(b))
  var_a = float(np.var(a, ddof=1)) if len(a) > 1 else None
  var_b = float(np.var(b, ddof=1)) if len(b) > 1 else None
  if var_a is None and var_b is None:
    return diff, math.nan, 'one run each: no spread to judge the difference by'
  if var_a is None or var_b is None:
    # One variance estimate serves both groups: its degrees of freedom are all there are.
    shared, runs = (var_b, len(b)) if var_a is None else (var_a, len(a))
    se = math.sqrt(shared / len(a) + shared / len(b))
    note = 'one group has a single run; its spread is taken to be the other group\'s'
    return diff, float(stats.t.ppf(0.975, runs - 1)) * se, note
  se_a, se_b = var_a / len(a), var_b / len(b)
  if se_a + se_b == 0:
    return diff, 0.0, ''
  dof = (se_a + se_b) ** 2 / (se_a ** 2 / (len(a) - 1) + se_b ** 2 / (len(b) - 1))
  return diff, float(stats.t.ppf(0.975, dof)) * math.sqrt(se_a + se_b), ''


def judge(claim: Claim, rows: list[dict]) -> dict:
  """{'verdict', 'a', 'b' (the values), 'difference', 'half_width', 'note', 'line'}."""
  a, b = claim.a.select(rows, claim.metric), claim.b.select(rows, claim.metric)
  out = {'claim': claim.text, 'a': a, 'b': b}
  if not a or not b:
    missing = ' and '.join(g.label() for g, v in ((claim.a, a), (claim.b, b)) if not v)
    out.update(verdict='not run yet', line=f'**Not run yet**: {claim.text}. No finished '
               f'run of {missing} with {claim.metric}.')
    return out
  diff, half, note = welch_interval(a, b)
  low, high = diff - half, diff + half
  if math.isnan(half):
    verdict = 'inconclusive'
  elif claim.kind == 'greater':
    verdict = 'reproduced' if low > 0 else 'not reproduced' if high <= 0 else 'inconclusive'
  elif claim.kind == 'at_most':
    verdict = ('reproduced' if high < claim.margin else
               'not reproduced' if low >= claim.margin else 'inconclusive')
  else:
    inside = -claim.margin < low and high < claim.margin
    outside = low >= claim.margin or high <= -claim.margin
    verdict = 'reproduced' if inside else 'not reproduced' if outside else 'inconclusive'
  out.update(verdict=verdict, difference=diff, half_width=half, note=note)
  percent = any(p in claim.metric for p in PERCENT_METRICS)
  value = (lambda v: f'{100 * v:.2f}%') if percent else (lambda v: f'{v:.4f}')
  delta = (lambda v: f'{100 * v:+.2f} points') if percent else (lambda v: f'{v:+.4f}')
  spread = (lambda v: f'{100 * v:.2f}') if percent else (lambda v: f'{v:.4f}')

  def group(g: Group, values: list[float]) -> str:
    sd = f' \u00b1 {spread(np.std(values, ddof=1))}' if len(values) > 1 else ''
    return f'{g.label()} {value(np.mean(values))}{sd} ({len(values)} run{"s" * (len(values) > 1)})'

  interval = ('' if math.isnan(half) else
              f' \u00b1 {spread(half)} (95% interval)')
  margin = {'within': f'; margin \u00b1{spread(claim.margin)}',
            'at_most': f'; margin +{spread(claim.margin)}'}.get(claim.kind, '')
  out['line'] = (f'**{verdict.capitalize()}**: {claim.text}. {claim.metric.replace("last_", "")}: '
                 f'{group(claim.a, a)} against {group(claim.b, b)}: {delta(diff)}{interval}'
                 f'{margin}.' + (f' ({note}.)' if note else ''))
  return out
