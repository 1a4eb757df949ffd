"""The pieces learn together: sampler → reward → advantages → MCPO update raises the reward.

A 16-token vocabulary model is rewarded when its first response token is the target token of
its domain (two domains, different targets). A few MCPO steps on the 2×4 CPU mesh must raise the
mean reward well above the random-policy level of 1/16.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mcpo_jax.batch import TrainBatch
from mcpo_jax.mesh import make_mesh
from mcpo_jax.model import init_model
from mcpo_jax.model.config import ModelConfig
from mcpo_jax.objectives import ObjectiveConfig, grpo_advantages
from mcpo_jax.sampling import generate
from mcpo_jax.train import (OptimConfig, UpdateConfig, init_train_state, jit_update_step, make_optimizer,
                            merge_policy, shard_batch)

CONFIG = ModelConfig("llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
TARGETS = np.array([3, 11])  # domain d is rewarded for starting its answer with TARGETS[d]
PROMPTS, GROUP, STEPS = 4, 8, 12


def test_mcpo_updates_raise_the_reward_on_a_learnable_task():
  mesh = make_mesh(1, 2, 4)
  model = init_model(CONFIG, mesh=mesh, seed=0)
  optimizer = make_optimizer(OptimConfig(learning_rate=3e-2, head_learning_rate=1e-2))
  graphdef, state = init_train_state(model, optimizer, proj_dim=8)
  state, rewards_per_step = train_on_the_task(graphdef, state, optimizer, mesh)
  first, last = np.mean(rewards_per_step[:3]), np.mean(rewards_per_step[-3:])
  assert first < 0.3, rewards_per_step  # near the random policy's 1/16
  assert last > first + 0.3, rewards_per_step
  print("mean reward per step:", np.round(rewards_per_step, 3))


def train_on_the_task(graphdef, state, optimizer, mesh, frozen=None):
  """STEPS MCPO updates on the learnable task; (final state, mean reward of each step's rollouts).
  frozen: a LoRA model's base weights (tests/test_lora.py)."""
  objective = ObjectiveConfig(group_size=GROUP, kl_coef=0.0, lambda_cross=0.05, lambda_in=0.05)
  update = jit_update_step(graphdef, optimizer, UpdateConfig(objective=objective), state)
  rng = np.random.default_rng(0)
  domain_of_prompt = np.array([0, 1, 0, 1])
  rewards_per_step = []
  for step in range(STEPS):
    prompts = rng.integers(0, 16, (PROMPTS, 6))
    policy = merge_policy(graphdef, state.params["lm"], frozen)
    rollouts = generate(policy, prompts, np.ones_like(prompts), group_size=GROUP, max_new_tokens=3,
                        temperature=1.0, key=jax.random.key(1), step=step)
    domain_ids = np.repeat(domain_of_prompt, GROUP)
    rewards = (np.asarray(rollouts.tokens)[:, 0] == TARGETS[domain_ids]).astype(np.float32)
    rewards_per_step.append(rewards.mean())
    batch = TrainBatch(prompt_tokens=rollouts.prompt_tokens, prompt_mask=rollouts.prompt_mask, tokens=rollouts.tokens,
                       mask=rollouts.response_mask, old_logp=rollouts.logprobs, ref_logp=rollouts.logprobs,
                       rewards=rewards, correct=rewards.astype(np.int32), group_ids=np.repeat(np.arange(PROMPTS), GROUP),
                       domain_ids=domain_ids, advantages=np.asarray(grpo_advantages(jnp.asarray(rewards), GROUP)))
    state, metrics = update(state, shard_batch(batch, mesh), jnp.ones((2, 2)), frozen)
    assert float(metrics["skipped"]) == 0
  return state, rewards_per_step
