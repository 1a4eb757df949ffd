"""`gym` verifier: reasoning-gym's own `score_answer` for the generator that made the example.

Many generators give partial credit (e.g. a prefix of the right word); MCPO needs a right/wrong verdict,
so only a full score counts: the verifier returns 1.0 or 0.0.
"""

from __future__ import annotations

import functools
import json

from mcpo_jax.rewards.extract import final_answer


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config_json: str):
  import reasoning_gym
  return reasoning_gym.create_dataset(name, size=1, seed=0, **json.loads(config_json))


def score(completion: str, example: dict) -> float:
  """`example` holds `gym_dataset`, `gym_config` (generator settings), `answer` and `metadata`."""
  dataset = _dataset(example["gym_dataset"], json.dumps(example.get("gym_config") or {}, sort_keys=True))
  entry = {"question": example.get("prompt", ""), "answer": example["answer"], "metadata": example["metadata"]}
  return float(dataset.score_answer(final_answer(completion), entry) >= 1.0)
