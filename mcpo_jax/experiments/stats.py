"""Confidence intervals for held-out accuracies and paired arm differences: a two-way cluster bootstrap.

The data of one comparison cell is a [S, P] table: one score per (seed, prompt), e.g. whether the
greedy answer was right, or arm − mixed GRPO of that score on the same prompt with the same seed.
Seeds (whole training runs) and prompts (draws from the domain) are the two random factors, so
each bootstrap draw resamples seeds and, independently, prompts with replacement and takes the
mean of the resampled table (the "pigeonhole" bootstrap, Owen 2007). Its variance counts the
seed-level, the prompt-level and the seed×prompt variation (the last one twice, so it errs on the
wide side). The same seed draw is used for every domain (a seed is one run that covers them all),
and the average over domains is taken inside each draw, so the "average" interval keeps the
correlation between domains.

What it cannot do: with S seeds the seed-level variance is known from S values only. With S = 2 a
run-wide shift of one seed's accuracy is estimated from one difference and the interval can be too
narrow when such shifts are large against the prompt-level noise; more seeds are the remedy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

POWER_80 = 2.8  # (z_0.975 + z_0.8) ≈ 1.96 + 0.84: a true difference of 2.8 SE is detected 80% of the time


@dataclass(frozen=True)
class Interval:
  estimate: float  # the mean of the observed table
  low: float  # percentile interval of the bootstrap means
  high: float
  se: float  # the bootstrap standard deviation of the mean

  @property
  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0

  @property
  def detectable(self) -> float:
    """The smallest true difference found 80% of the time by a two-sided 5% test with this SE."""
    return POWER_80 * self.se


def cluster_bootstrap(tables: Mapping[str, np.ndarray], *, draws: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict[str, Interval]:
  """{domain: [S, P_domain] scores} -> {domain: Interval, "average": Interval (domains weigh the same)}."""
  tables = {name: np.asarray(table, np.float64) for name, table in tables.items()}
  seeds = {table.shape[0] for table in tables.values()}
  if len(seeds) != 1 or not all(table.ndim == 2 and table.size for table in tables.values()):
    raise ValueError(f"cluster_bootstrap: every table must be [seeds, prompts] with the same seeds; got shapes "
                     f"{ {name: table.shape for name, table in tables.items()} }.")
  (num_seeds,) = seeds
  rng = np.random.default_rng(seed)
  seed_weights = rng.multinomial(num_seeds, np.full(num_seeds, 1 / num_seeds), size=draws)  # [B, S]
  means = {}
  for name, table in tables.items():
    prompts = table.shape[1]
    prompt_weights = rng.multinomial(prompts, np.full(prompts, 1 / prompts), size=draws)  # [B, P]
    means[name] = ((seed_weights @ table) * prompt_weights).sum(axis=1) / (num_seeds * prompts)  # [B]
  means["average"] = np.mean([means[name] for name in tables], axis=0)
  observed = {name: float(table.mean()) for name, table in tables.items()}
  observed["average"] = float(np.mean(list(observed.values())))
  tail = 50 * (1 - level)
  return {name: Interval(observed[name], float(np.percentile(draw, tail)), float(np.percentile(draw, 100 - tail)),
                         float(draw.std(ddof=1))) for name, draw in means.items()}


def noise_floor(records: Sequence[dict], k: int, seeds: int) -> dict[str, dict[str, float]]:
  """{domain or "average": {"se", "detectable"}} of mean@k(first k samples) − mean@k(last k) over per-prompt
  eval records with 2k samples: the sampling noise of comparing two equal policies, scaled to `seeds` seeds."""
  tables = {}
  for record in records:
    sampled = np.asarray(record["sampled_correct"], float)  # [2k]
    tables.setdefault(record["domain"], []).append(sampled[:k].mean() - sampled[k:].mean())
  intervals = cluster_bootstrap({d: np.asarray(v)[None] for d, v in tables.items()})  # one "seed": [1, P]
  return {name: {"se": i.se / np.sqrt(seeds), "detectable": i.detectable / np.sqrt(seeds)}
          for name, i in intervals.items()}


def verdict(difference: Interval, collapsed: bool = False) -> str:
  """"better" / "worse" only when the interval excludes 0; a collapsed arm is never called better."""
  ci = f"CI [{difference.low:+.3f}, {difference.high:+.3f}]"
  if not difference.excludes_zero:
    word = "no difference detected"
  else:
    word = "better" if difference.low > 0 else "worse"
  if collapsed:
    word = "collapsed (at or below the constant-answer baseline): " + ("not counted as better" if word == "better" else word)
  return f"{word}, {ci}"
