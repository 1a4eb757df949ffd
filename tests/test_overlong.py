"""DAPO's overlong reward shaping against a hand-written reference, and its config checks."""

import numpy as np
import pytest

from mcpo_jax.rewards.overlong import overlong_penalty


def reference(length: int, budget: int, buffer: int, factor: float) -> float:
  """DAPO §3.4, case by case."""
  if buffer == 0 or length <= budget - buffer:
    return 0.0
  if length <= budget:
    return factor * ((budget - buffer) - length) / buffer
  return -factor


@pytest.mark.parametrize("budget,buffer,factor", [(48, 16, 1.0), (48, 1, 0.5), (4096, 512, 1.0), (48, 0, 1.0)])
def test_overlong_penalty_matches_the_reference(budget, buffer, factor):
  rng = np.random.default_rng(budget + buffer)
  lengths = np.concatenate([rng.integers(0, budget + 1, 200), [0, budget - buffer, budget - buffer + 1, budget]])
  got = overlong_penalty(lengths, budget, buffer, factor)
  want = np.array([reference(int(n), budget, buffer, factor) for n in lengths])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert got.dtype == np.float32 and got.min() >= -factor and got.max() <= 0
  if buffer:
    assert got[-1] == -factor and got[-3] == 0  # the budget costs the whole penalty; the buffer's edge nothing


def test_overlong_buffer_must_leave_room():
  from configs.multi_domain import get_config
  from mcpo_jax import config as config_lib
  config = get_config("tiny")
  config.rewards.overlong_buffer = config.rollout.max_new_tokens
  with pytest.raises(config_lib.ConfigError, match="overlong_buffer=8 is not below --config.rollout.max_new_tokens=8"):
    config_lib.build(config)
  config.rewards.overlong_buffer = 4
  assert config_lib.build(config).rewards.overlong_buffer == 4
