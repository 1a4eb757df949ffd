"""The comparison's statistics: the two-way cluster bootstrap against its exact variance (NumPy), and the
verdict rule's error rates on simulated comparisons: with no true difference it declares one in at most
5% of the simulations; a planted difference it finds."""

import numpy as np
import pytest

from mcpo_jax.experiments.stats import POWER_80, Interval, cluster_bootstrap, noise_floor, verdict

SIMULATIONS = 600  # per check; each is one simulated comparison of 2 seeds × 150 prompts


def exact_bootstrap_variance(table: np.ndarray) -> float:
  """Var of mean(w_s v_p Y_sp) / (S P) with w ~ Multinomial(S, 1/S), v ~ Multinomial(P, 1/P) independent:
  E[w_s w_t] = 1 + δ_st − 1/S (likewise v), so E[mean²] = tr(Yᵀ M Y N) / (S P)²."""
  seeds, prompts = table.shape
  m = np.eye(seeds) + (1 - 1 / seeds) * np.ones((seeds, seeds))
  n = np.eye(prompts) + (1 - 1 / prompts) * np.ones((prompts, prompts))
  return float(np.trace(table.T @ m @ table @ n) / (seeds * prompts) ** 2 - table.mean() ** 2)


@pytest.mark.parametrize("shape", [(2, 150), (3, 40), (5, 7)])
def test_bootstrap_matches_its_exact_variance(shape):
  rng = np.random.default_rng(shape[1])
  table = rng.normal(size=shape) + rng.normal(size=(shape[0], 1)) + rng.normal(size=(1, shape[1]))
  interval = cluster_bootstrap({"x": table}, draws=40_000)["x"]
  # 40k draws: the SD of a standard deviation estimate is ~1/sqrt(2·40k) ≈ 0.4% relative
  np.testing.assert_allclose(interval.se ** 2, exact_bootstrap_variance(table), rtol=0.03)
  assert interval.estimate == pytest.approx(table.mean())
  assert interval.low < interval.estimate < interval.high


def test_average_resamples_seeds_jointly_across_domains():
  rng = np.random.default_rng(0)
  shift = rng.normal(size=(3, 1)) * 5  # a run-wide seed effect shared by both domains
  tables = {"a": shift + rng.normal(size=(3, 30)), "b": shift + rng.normal(size=(3, 50))}
  intervals = cluster_bootstrap(tables, draws=20_000)
  assert intervals["average"].estimate == pytest.approx((tables["a"].mean() + tables["b"].mean()) / 2)
  # joint seed draws keep the shared shift: the average is not averaged down as independent domains would be
  independent = np.sqrt(intervals["a"].se ** 2 + intervals["b"].se ** 2) / 2
  assert intervals["average"].se > 1.3 * independent
  with pytest.raises(ValueError, match="same seeds"):
    cluster_bootstrap({"a": np.zeros((2, 5)), "b": np.zeros((3, 5))})


def simulate_comparison(rng: np.random.Generator, effect: float, seeds: int = 2, prompts: int = 150) -> np.ndarray:
  """arm − reference [S, P] of greedy 0/1 scores: each run's per-prompt log-odds are the prompt's difficulty
  plus a run-wide shift (σ 0.2) and a per-prompt perturbation (σ 0.5); the arm adds `effect` log-odds."""
  difficulty = rng.normal(-0.5, 1.5, prompts)

  def run(delta: float) -> np.ndarray:
    logits = difficulty + delta + rng.normal(0, 0.2, (seeds, 1)) + rng.normal(0, 0.5, (seeds, prompts))
    return (rng.random((seeds, prompts)) < 1 / (1 + np.exp(-logits))).astype(float)

  return run(effect) - run(0.0)


def declared(effect: float, level: float = 0.95) -> np.ndarray:
  rng = np.random.default_rng(1234)
  verdicts = [verdict(cluster_bootstrap({"d": simulate_comparison(rng, effect)}, draws=1000, level=level,
                                        seed=i)["d"]) for i in range(SIMULATIONS)]
  return np.array([not v.startswith("no difference") for v in verdicts])


def test_null_declares_a_difference_in_at_most_5_percent():
  assert declared(0.0).mean() <= 0.05
  # the simulation can catch a rule that is too eager: 60% intervals declare far more than 5%
  assert declared(0.0, level=0.6).mean() > 0.10


def test_a_planted_effect_is_detected():
  found = declared(1.0)  # +1 log-odds, about +0.14 in accuracy here
  assert found.mean() >= 0.8


def test_verdict_words():
  assert verdict(Interval(0.1, 0.02, 0.2, 0.05)) == "better, CI [+0.020, +0.200]"
  assert verdict(Interval(-0.1, -0.2, -0.01, 0.05)) == "worse, CI [-0.200, -0.010]"
  assert verdict(Interval(0.05, -0.01, 0.1, 0.03)) == "no difference detected, CI [-0.010, +0.100]"
  assert verdict(Interval(0.1, 0.02, 0.2, 0.05), collapsed=True) == (
      "collapsed (at or below the constant-answer baseline): not counted as better, CI [+0.020, +0.200]")
  assert verdict(Interval(-0.1, -0.2, -0.01, 0.05), collapsed=True).endswith("baseline): worse, CI [-0.200, -0.010]")
  assert Interval(0, -1, 1, 0.5).detectable == pytest.approx(POWER_80 * 0.5)


def test_noise_floor_is_the_bootstrap_se_of_the_half_split_difference():
  rng = np.random.default_rng(3)
  records = [{"domain": d, "sampled_correct": list(rng.random(8) < p)} for d, p in (("a", 0.3), ("b", 0.6))
             for _ in range(120)]
  floor = noise_floor(records, k=4, seeds=2)
  halves = {d: np.array([[np.mean(r["sampled_correct"][:4]) - np.mean(r["sampled_correct"][4:])
                          for r in records if r["domain"] == d]]) for d in ("a", "b")}
  reference = cluster_bootstrap(halves)
  for name in ("a", "b", "average"):
    assert floor[name]["se"] == pytest.approx(reference[name].se / np.sqrt(2))
    assert floor[name]["detectable"] == pytest.approx(POWER_80 * floor[name]["se"])
  # the SE of a mean of P paired differences of two k-sample means: sqrt(2 p (1 - p) / k / P), NumPy
  assert floor["a"]["se"] * np.sqrt(2) == pytest.approx(np.sqrt(2 * 0.3 * 0.7 / 4 / 120), rel=0.2)
  same = [{"domain": "a", "sampled_correct": [True, False] * 2} for _ in range(10)]
  assert noise_floor(same, k=2, seeds=2)["a"]["se"] == 0
