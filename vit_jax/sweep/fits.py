"""Fits of study results: the compute-efficient frontier and its power law, and the gain
of a doubling of the training budget."""

import math

import numpy as np


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


def doubling(finals: dict) -> dict | None:
  """{epochs: [final top-1 of each run]} -> the budgets' means, the gain of a doubling of
  the budget (a least-squares fit of the means against log2(epochs)) and the fit at twice
  the largest budget; None with fewer than two budgets."""
  if len(finals) < 2:
    return None
  budgets = sorted(finals)
  means = [float(np.mean(finals[e])) for e in budgets]
  gain, intercept = np.polyfit(np.log2(budgets), means, 1)
  return {'budgets': [{'epochs': e, 'runs': len(finals[e]), 'mean_top1': m}
                      for e, m in zip(budgets, means)],
          'gain_per_doubling': float(gain), 'next_epochs': 2 * budgets[-1],
          'projected_top1': float(intercept + gain * np.log2(2 * budgets[-1]))}


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The compute-efficient frontier: points with a lower loss than every cheaper point."""
  best, out = math.inf, []
  for compute, loss in sorted(points):
    if loss < best:
      best = loss
      out.append((compute, loss))
  return out
