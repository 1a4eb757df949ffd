"""The cross-format alignment statistic (experiments/alignment.py) against a loop-by-loop reference."""

import itertools

import numpy as np

from mcpo_jax.experiments.alignment import alignment


def _reference(pooled, formats):
  x = pooled.reshape(formats, -1, pooled.shape[-1]).astype(np.float64)
  mean = x.reshape(-1, x.shape[-1]).mean(0)
  unit = lambda v: (v - mean) / np.linalg.norm(v - mean)
  problems = x.shape[1]
  out = np.zeros(problems)
  pairs = list(itertools.combinations(range(formats), 2))
  for p in range(problems):
    for f, g in pairs:
      same = unit(x[f, p]) @ unit(x[g, p])
      others = [unit(x[f, p]) @ unit(x[g, q]) for q in range(problems) if q != p]
      others += [unit(x[f, q]) @ unit(x[g, p]) for q in range(problems) if q != p]
      out[p] += (same - np.mean(others)) / len(pairs)
  return out


def test_matches_the_loop_reference_on_random_inputs():
  rng = np.random.default_rng(0)
  pooled = rng.normal(size=(3 * 7, 5)) + 4.0  # a shared offset, as raw pooled states have
  np.testing.assert_allclose(alignment(pooled, 3), _reference(pooled, 3), atol=1e-12)


def test_shared_problem_identity_scores_high_and_none_scores_zero():
  rng = np.random.default_rng(1)
  problem = rng.normal(size=(1, 40, 16))
  formats = rng.normal(size=(3, 1, 16))
  aligned = (problem + 0.3 * formats + 0.3 * rng.normal(size=(3, 40, 16))).reshape(-1, 16)
  unrelated = rng.normal(size=(3 * 40, 16))
  assert alignment(aligned, 3).mean() > 0.5
  assert abs(alignment(unrelated, 3).mean()) < 0.05
