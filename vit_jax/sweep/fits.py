"""Fits of scaling results: the compute-efficient frontier and its power law."""

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


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The compute-efficient frontier: points with a lower loss than every cheaper point."""
  best, out = math.inf, []
  for compute, loss in sorted(points):
    if loss < best:
      best = loss
      out.append((compute, loss))
  return out
