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


# ------------------------------------------------------------------------------ rewards.mask_truncated
# DAPO §3.4's overlong filtering masks the loss of truncated samples; their rewards still enter their group's
# advantage statistics. The reference drops the rows outright (tests/numpy_objectives.py on the kept rows, with
# the advantages of the full groups); JAX keeps them in the batch with TrainBatch.in_loss = 0. Tolerances as
# in tests/test_objectives.py: values within 1e-5 (abs and rel), gradients within 1e-5 of max(1, max |ref|).

MASKED_CONFIGS = [{}, dict(algorithm="grpo", agg="seq-mean-token-mean"), dict(agg="seq-mean-token-sum-norm", kl_kind="k2"),
                  dict(denominator="per_term", negative_scope="batch", cross_topk=2)]


def _truncated_rows(batch) -> np.ndarray:
  """[N] bool: about a third of the rows, among them an anchor whose prompt keeps a wrong row (it would count)
  and a wrong row whose prompt keeps a correct one (it would be a negative)."""
  rng = np.random.default_rng(7)
  truncated = rng.random(len(batch["correct"])) < 0.3
  g, correct = batch["group_size"], batch["correct"].astype(bool)
  for want in (True, False):
    group = next(p for p in range(len(correct) // g) if correct[p * g:(p + 1) * g].any() and not correct[p * g:(p + 1) * g].all())
    rows = np.arange(group * g, (group + 1) * g)
    truncated[rows] = False
    truncated[rows[correct[rows] == want][0]] = True
  return truncated


@pytest.mark.parametrize("overrides", MASKED_CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_masked_truncated_rows_are_out_of_the_loss_but_in_the_group_statistics(overrides):
  import jax
  import jax.numpy as jnp
  import numpy_objectives as ref
  import torch
  from test_objectives import BATCHES, close, close_grad, close_metrics, config, jax_batch, make_batch, pooled_of

  from mcpo_jax import objectives as obj
  batch = make_batch(*BATCHES[0])
  cfg = config(batch, **overrides)
  truncated = _truncated_rows(batch)
  kept = np.flatnonzero(~truncated)
  pooled = pooled_of(batch)

  jb = jax_batch(batch).replace(in_loss=jnp.asarray((~truncated).astype(np.int32)))
  head = None if cfg.algorithm == "grpo" else jnp.asarray(batch["head"], jnp.float32)
  (loss, metrics), (g_logp, g_pooled, g_head) = jax.value_and_grad(
      lambda lp, po, hd: obj.mcpo_loss(lp, po, hd, jb, jnp.asarray(batch["transfer"]), cfg), argnums=(0, 1, 2),
      has_aux=True)(jnp.asarray(batch["logp"], jnp.float32), jnp.asarray(pooled, jnp.float32), head)

  per_row = ("group_ids", "domain_ids", "rewards", "correct", "mask", "logp", "old_logp", "ref_logp", "advantages")
  sub = dict(batch, **{key: batch[key][kept] for key in per_row})  # advantages: those of the full groups
  t_logp, t_pooled, t_head = (torch.tensor(x, dtype=torch.float64, requires_grad=True)
                              for x in (sub["logp"], pooled[kept], batch["head"]))
  ref_loss, ref_metrics = ref.mcpo_loss(t_logp, t_pooled, t_head, sub, batch["transfer"], cfg)
  ref_loss.backward()
  close(loss, ref._value(ref_loss), what="loss")
  keys = ("pg_loss", "kl", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")
  if cfg.algorithm == "mcpo":
    keys += ("contrastive", "l_cross", "l_in", "pos_sim", "neg_sim", "anchors", "cross_pos_per_anchor")
  close_metrics(metrics, {k: ref._value(v) for k, v in ref_metrics.items() if k in keys}, keys)
  close_grad(np.asarray(g_logp)[kept], t_logp.grad.numpy(), what="d/dlogp, kept rows")
  assert np.all(np.asarray(g_logp)[truncated] == 0.0)  # a masked row gets no gradient at all
  if cfg.algorithm == "mcpo":
    close_grad(np.asarray(g_pooled)[kept], t_pooled.grad.numpy(), what="d/dpooled, kept rows")
    assert np.all(np.asarray(g_pooled)[truncated] == 0.0)
    close_grad(g_head, t_head.grad.numpy(), what="d/dhead")
  unmasked, _ = obj.mcpo_loss(jnp.asarray(batch["logp"], jnp.float32), jnp.asarray(pooled, jnp.float32), head,
                              jax_batch(batch), jnp.asarray(batch["transfer"]), cfg)
  assert abs(float(unmasked) - float(loss)) > 1e-3  # the masked rows did carry loss


def test_train_batch_masks_truncated_rows_only_when_asked():
  """rl_loop.train_batch: rewards.mask_truncated sets in_loss = not truncated; advantages use every row."""
  from types import SimpleNamespace

  from configs.multi_domain import get_config
  from mcpo_jax import config as config_lib
  from mcpo_jax.rl_loop import train_batch
  group, rows, length = 4, 12, 5
  rng = np.random.default_rng(0)
  rollouts = SimpleNamespace(prompt_tokens=np.ones((rows, 3), np.int32), prompt_mask=np.ones((rows, 3), np.int32),
                             tokens=np.ones((rows, length), np.int32), response_mask=np.ones((rows, length), np.int32),
                             logprobs=np.zeros((rows, length), np.float32), truncated=rng.random(rows) < 0.5)
  rewards = rng.choice([0.0, 1.0], rows).astype(np.float32)
  config = get_config("tiny")
  config.rollout.group_size = group
  assert train_batch(rollouts, rewards, rewards > 0, np.zeros(rows), config_lib.build(config), None).in_loss is None
  config.rewards.mask_truncated = True
  batch = train_batch(rollouts, rewards, rewards > 0, np.zeros(rows), config_lib.build(config), None)
  np.testing.assert_array_equal(np.asarray(batch.in_loss), ~rollouts.truncated)
  groups = rewards.reshape(-1, group)
  want = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
  np.testing.assert_allclose(np.asarray(batch.advantages), want, rtol=1e-6, atol=1e-6)
