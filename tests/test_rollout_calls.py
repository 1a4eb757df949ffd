"""rollout.max_rows_per_call: a step's prompts sampled in several calls (each call's KV cache bounded) give the
same rollouts as one call where sampling is deterministic, and fresh draws in every call where it is not."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from conftest import left_padded_batch
from mcpo_jax.config import ConfigError, RolloutSettings, build, defaults
from mcpo_jax.mesh import make_mesh, to_host
from mcpo_jax.model import init_model
from mcpo_jax.model.config import ModelConfig
from mcpo_jax.rl_loop import collect_rollouts

CONFIG = ModelConfig("qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16)
B, G = 6, 4


def _collect(rows_per_call: int, top_k: int):
  model = init_model(CONFIG, seed=0, mesh=make_mesh(1, 8, 1))
  tokens, mask = left_padded_batch(np.random.default_rng(0), B, 7, 256, pads=(0, 3, 1, 0, 2, 5))
  config = SimpleNamespace(rollout=RolloutSettings(group_size=G, max_new_tokens=9, top_k=top_k,
                                                   max_rows_per_call=rows_per_call))
  rollouts = collect_rollouts(model, SimpleNamespace(prompt_tokens=tokens, prompt_mask=mask), config,
                              SimpleNamespace(pad_token_id=0), stops=(), key=jax.random.key(3), step=1)
  return jax.tree.map(to_host, rollouts)


@pytest.mark.parametrize("rows_per_call", [G, 2 * G, 4 * G])  # 6 calls; 3; 2 of which the last is short
def test_calls_of_bounded_rows_equal_one_call(rows_per_call):
  whole, split = _collect(0, top_k=1), _collect(rows_per_call, top_k=1)  # top_k = 1: every draw is the argmax
  for name in ("tokens", "response_mask", "lengths", "prompt_tokens", "prompt_mask"):
    np.testing.assert_array_equal(getattr(split, name), getattr(whole, name), err_msg=name)
  np.testing.assert_allclose(split.logprobs, whole.logprobs, atol=1e-5)


def test_every_call_draws_anew():
  whole, split = _collect(0, top_k=0), _collect(2 * G, top_k=0)
  first = slice(0, 2 * G)
  np.testing.assert_array_equal(split.tokens[first], whole.tokens[first])  # the first call keeps the step's key
  assert not np.array_equal(split.tokens[first], split.tokens[2 * G:4 * G])  # calls do not repeat one another
  assert not np.array_equal(split.tokens[2 * G:], whole.tokens[2 * G:])


def test_mlp_over_fsdp_without_gathered_weights_is_one_clear_error():
  config = defaults()
  config.rollout.mlp_over_fsdp = True
  with pytest.raises(ConfigError, match="mlp_over_fsdp=true splits the weights the sampler gathers; set "
                                        "--config.rollout.gather_weights=true"):
    build(config)


def test_rows_per_call_must_hold_whole_groups():
  config = defaults()
  config.rollout.max_rows_per_call = 7
  with pytest.raises(ConfigError, match="max_rows_per_call=7 is not a multiple of --config.rollout.group_size=6"):
    build(config)
