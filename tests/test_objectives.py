"""mcpo_jax.objectives against an independent plain-loop NumPy reference (tests/numpy_objectives.py).

The reference is written from docs/DESIGN.md §4 and the docstrings, scalar by scalar; its gradients come
from torch autograd (float64) running the same loops on tensors. JAX runs in float32 on inputs that
are exactly representable in float32, so every difference below is float32 rounding of JAX alone.

Tolerances (float32 JAX vs float64 reference):
  VALUE_TOL = 1e-5   |jax − ref| ≤ 1e-5 + 1e-5·|ref| for every loss, per-token value, per-anchor value,
                     advantage and metric (observed worst: 7e-7 relative to max(1, |ref|));
  GRAD_TOL = 1e-5    |jax − torch| ≤ 1e-5 · max(1, max |torch gradient|), per gradient array
                     (observed worst: 3e-7 of that scale);
  MICRO_TOL = 1e-6   sum of micro-batch partial losses vs the full-batch loss.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_objectives as ref
import pytest
import torch

from mcpo_jax import objectives as obj
from mcpo_jax.batch import TrainBatch

VALUE_TOL = 1e-5
GRAD_TOL = 1e-5
MICRO_TOL = 1e-6
LENGTH, WIDTH, PROJ = 8, 12, 8  # T, E, P: one set of shapes so eager JAX reuses its compiled ops

# (prompts of each domain, group size, seed): ≥ 3 domains, ≥ 2 prompts each, G ≥ 4. All have N = 32 rows, so
# eager JAX compiles each primitive once (compilation, not arithmetic, is what costs time here).
BATCHES = [((3, 3, 2), 4, 0), ((2, 2, 2, 2), 4, 1), ((2, 4, 2), 4, 2)]
EDGE_SPEC = ((2, 3, 3), 4, 5)


# ----------------------------------------------------------------------------------------------- data


def _f32(x) -> np.ndarray:
  """float64 values that float32 represents exactly, so JAX and the reference see the same input."""
  return np.asarray(np.asarray(x, np.float64).astype(np.float32), np.float64)


def make_batch(prompts_per_domain: tuple[int, ...], group_size: int, seed: int) -> dict:
  """A random MCPO batch (rows of a prompt consecutive, domains interleaved) with every branch hit.

  Log-ratios mix small values (unclipped), ±0.2..3 (PPO clip and dual clip bind) and ±25 (the ±20
  log-ratio clip); reference log-ratios hit the k3 value clip; padding positions hold garbage.
  """
  rng = np.random.default_rng(seed)
  num_domains = len(prompts_per_domain)
  num_prompts = sum(prompts_per_domain)
  n = num_prompts * group_size
  prompt_domain = rng.permutation(np.repeat(np.arange(num_domains), prompts_per_domain))
  group_ids = np.repeat(np.arange(num_prompts), group_size)
  domain_ids = np.repeat(prompt_domain, group_size)
  rewards = rng.choice([0.0, 0.25, 1.0], size=n, p=[0.35, 0.15, 0.5])
  correct = (rewards >= 0.5).astype(np.int32)
  lengths = rng.integers(1, LENGTH + 1, size=n)
  lengths[0] = LENGTH
  mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
  logp = -rng.exponential(1.0, size=(n, LENGTH))
  log_ratio = np.where(rng.random((n, LENGTH)) < 0.7, rng.normal(0.0, 0.15, (n, LENGTH)),
                       rng.uniform(-3.0, 3.0, (n, LENGTH)))
  log_ratio[1, 0], log_ratio[2, 0] = 25.0, -25.0  # beyond the ±20 clip
  old_logp = logp - log_ratio
  ref_logp = logp + rng.normal(0.0, 1.0, (n, LENGTH))
  ref_logp[3, 0], ref_logp[4, 0], ref_logp[5, 0] = logp[3, 0] + 4.0, logp[4, 0] + 25.0, logp[5, 0] - 25.0
  garbage = rng.normal(0.0, 30.0, (n, LENGTH))
  logp = np.where(mask > 0, logp, garbage)  # padding must not matter
  hidden = rng.normal(size=(n, LENGTH, WIDTH))
  head = rng.normal(size=(WIDTH, PROJ)) / np.sqrt(WIDTH)
  transfer = (rng.random((num_domains, num_domains)) < 0.7).astype(np.int32)
  np.fill_diagonal(transfer, 1)
  transfer[0, 1] = 1  # at least one cross-domain pair allowed
  transfer[1, 0] = 0  # and one forbidden, so the transfer matrix matters
  return dict(group_ids=group_ids.astype(np.int32), domain_ids=domain_ids.astype(np.int32),
              rewards=_f32(rewards), correct=correct, mask=mask, logp=_f32(logp), old_logp=_f32(old_logp),
              ref_logp=_f32(ref_logp), hidden=_f32(hidden), head=_f32(head), transfer=transfer,
              advantages=_f32(ref.grpo_advantages(rewards, group_size)), group_size=group_size,
              num_domains=num_domains)


def random_z(n: int, seed: int) -> np.ndarray:
  z = np.random.default_rng(seed + 100).normal(size=(n, PROJ))
  return _f32(z / np.linalg.norm(z, axis=1, keepdims=True))


def jax_batch(batch: dict) -> TrainBatch:
  """The objective's fields of a test batch as a TrainBatch (the token fields, which it never reads, empty)."""
  keys = ("old_logp", "ref_logp", "mask", "advantages", "rewards", "group_ids", "domain_ids", "correct")
  fields = {k: jnp.asarray(batch[k], jnp.float32 if batch[k].dtype == np.float64 else batch[k].dtype) for k in keys}
  empty = jnp.zeros((batch["mask"].shape[0], 0), jnp.int32)
  return TrainBatch(prompt_tokens=empty, prompt_mask=empty, tokens=empty, **fields)


def j32(x) -> jax.Array:
  return jnp.asarray(np.asarray(x), jnp.float32)


def close(actual, expected, tol=VALUE_TOL, what=""):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol, err_msg=what)


def close_metrics(jax_metrics: dict, ref_metrics: dict, keys, tol=VALUE_TOL):
  for key in keys:
    close(jax_metrics[key], ref_metrics[key], tol, what=key)


def close_grad(actual, expected, what=""):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(1.0, float(np.max(np.abs(expected))))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=GRAD_TOL * scale, err_msg=what)


def config(batch, **overrides) -> obj.ObjectiveConfig:
  return obj.ObjectiveConfig(**({"group_size": batch["group_size"]} | overrides))


def pooled_of(batch) -> np.ndarray:
  """The pooled input of mcpo_loss: the reference pooling, rounded to float32 for both sides."""
  return _f32(ref.pool_response(batch["hidden"], batch["mask"]))


# ------------------------------------------------------------------------------------------------ GRPO


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("spec", BATCHES)
def test_grpo_advantages(spec, normalize_std):
  batch = make_batch(*spec)
  rewards = batch["rewards"].copy()
  rewards[:8] = 1.0  # an all-equal group for every group size below: std 0 -> advantages exactly 0
  odd = _f32(np.random.default_rng(spec[-1]).choice([0.0, 0.5, 1.0], size=30))
  for values, group in [(rewards, 4), (rewards, 8), (rewards, 2), (odd, 5), (odd, 6)]:
    got = obj.grpo_advantages(j32(values), group, normalize_std=normalize_std)
    close(got, ref.grpo_advantages(values, group, normalize_std), what=f"advantages G={group}")
    if values is rewards:
      assert np.all(np.asarray(got)[:8] == 0.0)
  assert np.all(np.asarray(obj.grpo_advantages(j32(rewards), 1)) == 0.0)  # group size 1 -> 0


@pytest.mark.parametrize("agg", obj.AGGREGATIONS)
@pytest.mark.parametrize("spec", BATCHES)
def test_aggregate_loss(spec, agg):
  batch = make_batch(*spec)
  values = _f32(np.random.default_rng(7).normal(size=batch["mask"].shape))
  values[batch["mask"] == 0] = 1e4  # padding must not leak into any aggregation
  got = obj.aggregate_loss(j32(values), jnp.asarray(batch["mask"]), agg)
  close(got, ref.aggregate(values.tolist(), batch["mask"], agg), what=agg)


@pytest.mark.parametrize("agg", obj.AGGREGATIONS)
@pytest.mark.parametrize("eps_low,eps_high,dual_clip", [(0.2, 0.2, 3.0), (0.2, 0.28, 2.0)])
@pytest.mark.parametrize("spec", BATCHES)
def test_policy_loss(spec, agg, eps_low, eps_high, dual_clip):
  batch = make_batch(*spec)
  loss, metrics = obj.policy_loss(j32(batch["logp"]), j32(batch["old_logp"]), j32(batch["advantages"]),
                                  jnp.asarray(batch["mask"]), eps_low=eps_low, eps_high=eps_high,
                                  dual_clip=dual_clip, agg=agg)
  ref_loss, ref_metrics = ref.policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"],
                                          eps_low, eps_high, dual_clip, agg)
  close(loss, ref_loss, what="policy loss")
  close_metrics(metrics, ref_metrics, ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"))
  assert ref_metrics["pg_clipfrac"] > 0 and ref_metrics["pg_clipfrac_lower"] > 0  # both clips bind here


@pytest.mark.parametrize("agg", obj.AGGREGATIONS)
@pytest.mark.parametrize("eps_low,eps_high", [(3e-4, 4e-4), (0.2, 0.28)])  # GSPO's ε, and GRPO-sized ones
@pytest.mark.parametrize("spec", BATCHES[:2])
def test_sequence_ratio_matches_the_reference_in_values_and_gradients(spec, agg, eps_low, eps_high):
  """ratio="sequence" (GSPO): values, metrics and ∂loss/∂logp against the reference loops (float64 torch
  autograd), with ragged and one empty response and garbage log-probs in the padding."""
  batch = make_batch(*spec)
  mask = batch["mask"].copy()
  mask[3] = 0  # an empty response: its ratio is 1, it adds nothing but a row to the row means
  args = dict(eps_low=eps_low, eps_high=eps_high, dual_clip=3.0, agg=agg)
  fn = lambda logp: obj.policy_loss(logp, j32(batch["old_logp"]), j32(batch["advantages"]), jnp.asarray(mask),
                                    ratio="sequence", **args)
  (loss, metrics), grad = jax.value_and_grad(fn, has_aux=True)(j32(batch["logp"]))
  logp = torch.tensor(batch["logp"], dtype=torch.float64, requires_grad=True)
  ref_loss, ref_metrics = ref.policy_loss(logp, batch["old_logp"], batch["advantages"], mask, ratio="sequence",
                                          **args)
  ref_loss.backward()
  close(loss, ref_loss.item(), what="sequence-ratio loss")
  close_metrics(metrics, ref_metrics, ("pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"))
  close_grad(grad, logp.grad.numpy(), what="sequence-ratio gradient")
  assert np.all(np.asarray(grad)[mask == 0] == 0)  # padding gets no gradient
  assert 0 < ref_metrics["pg_clipfrac"] < 1  # some rows clipped, some not
  token_loss = obj.policy_loss(j32(batch["logp"]), j32(batch["old_logp"]), j32(batch["advantages"]),
                               jnp.asarray(mask), **args)[0]
  assert abs(float(token_loss) - float(loss)) > 1e-4  # the two ratios are different objectives here


def test_sequence_ratio_of_one_token_rows_is_the_token_ratio():
  """With one response token per row, the sequence ratio is that token's ratio: GSPO equals GRPO."""
  batch = make_batch(*BATCHES[0])
  mask = np.zeros_like(batch["mask"])
  mask[:, 0] = 1
  values = [obj.policy_loss(j32(batch["logp"]), j32(batch["old_logp"]), j32(batch["advantages"]),
                            jnp.asarray(mask), ratio=ratio)[0] for ratio in obj.RATIOS]
  close(values[0], values[1], tol=1e-6, what="one-token rows")


def test_policy_loss_hand_computed():
  """Five tokens whose per-token losses are worked out by hand (ε = 0.2, c = 3), one token per row."""
  advantages = np.array([1.0, 1.0, -1.0, -1.0, -1.0])
  log_ratio = np.array([0.5, -0.5, -0.5, 2.0, 0.1])
  # A=1, ρ=e^.5=1.6487: max(−1.6487, −1.2) = −1.2 (clipped); A=1, ρ=e^−.5=.6065: max(−.6065, −.8) = −.6065;
  # A=−1, ρ=.6065: max(.6065, .8) = .8 (clipped); A=−1, ρ=e²=7.389: min(max(7.389, 1.2), 3) = 3 (dual clip);
  # A=−1, ρ=e^.1=1.1052: 1.1052 (inside the trust region).
  expected = [-1.2, -np.exp(-0.5), 0.8, 3.0, np.exp(0.1)]
  logp = np.zeros((5, 1))
  loss, metrics = obj.policy_loss(j32(logp), j32(-log_ratio[:, None]), j32(advantages), jnp.ones((5, 1), bool),
                                  agg="seq-mean-token-mean")
  close(loss, np.mean(expected), what="hand loss")
  close(metrics["pg_clipfrac"], 2 / 5)
  close(metrics["pg_clipfrac_lower"], 1 / 5)
  close(metrics["ppo_kl"], -np.mean(log_ratio))
  per_token = [ref.policy_loss(logp[i:i + 1], -log_ratio[i:i + 1, None], advantages[i:i + 1], np.ones((1, 1)))[0]
               for i in range(5)]
  close(per_token, expected, what="reference per-token")


@pytest.mark.parametrize("kind", obj.KL_KINDS)
@pytest.mark.parametrize("spec", BATCHES[:2])
def test_kl_penalty(spec, kind):
  batch = make_batch(*spec)
  got = obj.kl_penalty(j32(batch["logp"]), j32(batch["ref_logp"]), kind)
  expected = np.array([[float(v) for v in row] for row in ref.kl_penalty(batch["logp"], batch["ref_logp"], kind)])
  close(got, expected, what=kind)
  if kind == "k3":  # the value clip binds on the planted tokens
    assert expected[3, 0] == 10.0 and expected[4, 0] == 10.0 and expected[5, 0] == 10.0


# ----------------------------------------------------------------------------------- representations


@pytest.mark.parametrize("spec", BATCHES)
def test_pool_response_and_project(spec):
  batch = make_batch(*spec)
  mask = batch["mask"].copy()
  mask[2] = 0  # an empty response pools to 0 and projects to 0, not NaN
  pooled = obj.pool_response(j32(batch["hidden"]), jnp.asarray(mask))
  ref_pooled = ref.pool_response(batch["hidden"], mask)
  close(pooled, ref_pooled, what="pooled")
  z = obj.project(j32(_f32(ref_pooled)), j32(batch["head"]))
  ref_z = np.array([[float(v) for v in row] for row in ref.project(_f32(ref_pooled), batch["head"])])
  close(z, ref_z, what="z")
  assert np.all(np.asarray(z)[2] == 0.0)
  close(np.linalg.norm(np.delete(np.asarray(z), 2, axis=0), axis=1), np.ones(len(ref_z) - 1))


# ------------------------------------------------------------------------------------------ contrastive

KNOBS = list(itertools.product([0, 1, 4], ["domain", "prompt"], ["prompt", "batch"], [True, False],
                               ["shared", "per_term"]))


@pytest.mark.parametrize("in_scope,neg_scope", [("domain", "prompt"), ("prompt", "batch")])
@pytest.mark.parametrize("spec", BATCHES)
def test_contrastive_masks_random(spec, in_scope, neg_scope):
  batch = make_batch(*spec)
  got = obj.contrastive_masks(jnp.asarray(batch["group_ids"]), jnp.asarray(batch["domain_ids"]),
                              jnp.asarray(batch["correct"]), jnp.asarray(batch["transfer"]),
                              in_domain_scope=in_scope, negative_scope=neg_scope)
  expected = ref.contrastive_masks(batch["group_ids"], batch["domain_ids"], batch["correct"], batch["transfer"],
                                   in_scope, neg_scope)
  for name, g, e in zip(("cross", "in_domain", "negatives"), got, expected):
    np.testing.assert_array_equal(np.asarray(g).astype(int), np.array(e), err_msg=name)


@pytest.mark.parametrize("spec", BATCHES)
def test_contrastive_loss_all_knobs(spec):
  """Every combination of cross_topk × in_domain_scope × negative_scope × require_negative × denominator."""
  batch = make_batch(*spec)
  z = random_z(len(batch["correct"]), spec[-1])
  args = (batch["group_ids"], batch["domain_ids"], batch["correct"], batch["transfer"])
  jax_args = tuple(jnp.asarray(a) for a in args)
  pruned = False
  for topk, in_scope, neg_scope, require_negative, denominator in KNOBS:
    knobs = dict(tau=0.05, cross_topk=topk, in_domain_scope=in_scope, negative_scope=neg_scope,
                 require_negative=require_negative, lambda_cross=0.7, lambda_in=0.3, denominator=denominator)
    l_cross, l_in, per_anchor, metrics = obj.contrastive_loss(j32(z), *jax_args, **knobs)
    r_cross, r_in, r_per_anchor, r_metrics, details = ref.contrastive_loss(z, *args, **knobs, details=True)
    what = f"topk={topk} in={in_scope} neg={neg_scope} req={require_negative} denominator={denominator}"
    close(l_cross, r_cross, what=f"l_cross {what}")
    close(l_in, r_in, what=f"l_in {what}")
    close(per_anchor, r_per_anchor, what=f"per_anchor {what}")
    close_metrics(metrics, r_metrics, ("pos_sim", "neg_sim", "anchors", "cross_pos_per_anchor"))
    assert r_metrics["anchors"] > 0 and sum(details["counted_cross"]) > 0, what
    pruned |= topk > 0 and any(0 < len(k) == topk for k in details["kept_cross"])
    assert np.all(np.asarray(per_anchor)[batch["correct"] == 0] == 0.0)
  assert pruned  # the top-k really selected a strict subset somewhere


def test_contrastive_knobs_change_the_loss():
  """Guard against a knob that is silently ignored: each one changes some value on this batch."""
  batch = make_batch(*BATCHES[0])
  z = random_z(len(batch["correct"]), 0)
  args = (batch["group_ids"], batch["domain_ids"], batch["correct"], batch["transfer"])

  def run(**knobs):
    return [float(v) for v in ref.contrastive_loss(z, *args, **knobs)[:2]]

  base = run()
  assert run(cross_topk=1) != base
  assert run(in_domain_scope="prompt") != base
  assert run(negative_scope="batch") != base
  assert run(require_negative=False) != base
  per_term = run(denominator="per_term")
  assert per_term[0] != base[0] and per_term[1] != base[1]  # each term loses the other's positives


# Hand-built toy batch: 2 domains × 2 prompts × 4 rollouts. Rows 0-3 prompt 0 and rows 4-7 prompt 1 are
# domain 0; rows 8-11 prompt 2 and rows 12-15 prompt 3 are domain 1. Correct rows: 0, 1, 7, 8, 10, 11
# (prompt 3 is all wrong). Transfer [[1, 1], [0, 1]]: domain-0 anchors may take domain-1 positives, not
# the reverse.
TOY_CORRECT = [1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0]
TOY_TRANSFER = [[1, 1], [0, 1]]
TOY_CROSS = [
    "0000000010110000",  # 0: correct domain-1 rows 8, 10, 11
    "0000000010110000",  # 1
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000010110000",  # 7
    "0000000000000000",  # 8: T[1, 0] = 0
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
]
TOY_IN_DOMAIN = [  # in_domain_scope="domain"
    "0100000100000000",
    "1000000100000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "1100000000000000",
    "0000000000110000",
    "0000000000000000",
    "0000000010010000",
    "0000000010100000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
]
TOY_NEGATIVES = [  # negative_scope="prompt"
    "0011000000000000",
    "0011000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000111000000000",
    "0000000001000000",
    "0000000000000000",
    "0000000001000000",
    "0000000001000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
]
TOY_IN_PROMPT = [  # in_domain_scope="prompt"
    "0100000000000000",
    "1000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",  # 7 is the only correct row of prompt 1
    "0000000000110000",
    "0000000000000000",
    "0000000010010000",
    "0000000010100000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
]
TOY_NEG_BATCH = [  # negative_scope="batch": every wrong row of the batch
    "0011111001001111",
    "0011111001001111",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0011111001001111",
    "0011111001001111",
    "0000000000000000",
    "0011111001001111",
    "0011111001001111",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
    "0000000000000000",
]


def _matrix(rows: list[str]) -> np.ndarray:
  return np.array([[int(ch) for ch in row] for row in rows])


def _toy():
  group_ids = np.repeat(np.arange(4), 4)
  domain_ids = np.repeat([0, 0, 1, 1], 4)
  return group_ids, domain_ids, np.array(TOY_CORRECT), np.array(TOY_TRANSFER)


@pytest.mark.parametrize("in_scope,neg_scope,expected", [
    ("domain", "prompt", (TOY_CROSS, TOY_IN_DOMAIN, TOY_NEGATIVES)),
    ("prompt", "batch", (TOY_CROSS, TOY_IN_PROMPT, TOY_NEG_BATCH)),
])
def test_contrastive_masks_toy(in_scope, neg_scope, expected):
  args = _toy()
  got = obj.contrastive_masks(*(jnp.asarray(a) for a in args), in_domain_scope=in_scope, negative_scope=neg_scope)
  for name, g, rows in zip(("cross", "in_domain", "negatives"), got, expected):
    np.testing.assert_array_equal(np.asarray(g).astype(int), _matrix(rows), err_msg=name)
  for name, r, rows in zip(("cross", "in_domain", "negatives"), ref.contrastive_masks(*args, in_scope, neg_scope),
                           expected):
    np.testing.assert_array_equal(np.array(r), _matrix(rows), err_msg=f"reference {name}")


def test_toy_top_k_and_counting():
  """On the toy batch: top-1 keeps each domain-0 anchor's most similar domain-1 row; anchors are counted."""
  args = _toy()
  z = random_z(16, 3)
  l_cross, l_in, per_anchor, metrics = obj.contrastive_loss(j32(z), *(jnp.asarray(a) for a in args), cross_topk=1)
  cos = z @ z.T
  kept = {i: max((8, 10, 11), key=lambda j: cos[i, j]) for i in (0, 1, 7)}
  expected_cross = []
  for i in (0, 1, 7):  # cross anchors: 0, 1, 7 (negatives: 0,1 -> {2,3}; 7 -> {4,5,6})
    denominator = sorted({kept[i]} | {0, 1, 7} - {i} | ({2, 3} if i < 4 else {4, 5, 6}))
    lse = np.log(np.sum(np.exp(cos[i, denominator] / 0.05)))
    expected_cross.append(-(cos[i, kept[i]] / 0.05 - lse))
  close(l_cross, np.mean(expected_cross), what="toy l_cross")
  assert float(metrics["anchors"]) == 6.0  # 0, 1, 7, 8, 10, 11 all have an in-domain positive and a negative
  close(metrics["cross_pos_per_anchor"], 1.0)
  close(l_in, ref.contrastive_loss(z, *args, cross_topk=1)[1], what="toy l_in")


# ---------------------------------------------------------------------------------------------- total

MCPO_CONFIGS = [
    dict(),
    dict(agg="seq-mean-token-mean", kl_kind="k1", cross_topk=0, in_domain_scope="prompt", negative_scope="batch"),
    dict(agg="seq-mean-token-sum-norm", kl_kind="k2", cross_topk=1, require_negative=False, tau=0.1),
    dict(agg="token-mean", kl_kind="k3", repr_grad="head", eps_high=0.28, dual_clip=2.0),
    dict(agg="seq-mean-token-mean", kl_kind="k3", coupling="reward", lambda_cross=0.02, lambda_in=0.02),
    dict(agg="seq-mean-token-sum-norm", kl_kind="k1", coupling="reward", normalize_std=False, cross_topk=0),
    dict(algorithm="grpo", kl_kind="k2", agg="seq-mean-token-mean"),
    dict(denominator="per_term", cross_topk=2),
    dict(denominator="per_term", coupling="reward", in_domain_scope="prompt"),
]
MCPO_METRICS = ("loss", "pg_loss", "kl", "contrastive", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl")
CONTRASTIVE_METRICS = ("l_cross", "l_in", "pos_sim", "neg_sim", "anchors", "cross_pos_per_anchor")


def _jax_mcpo(batch, cfg, logp=None, pooled=None, head=None, transfer=None):
  """(loss, metrics, (d/dlogp, d/dpooled, d/dhead)) from JAX, float32."""
  logp = j32(batch["logp"] if logp is None else logp)
  pooled = j32(pooled_of(batch) if pooled is None else pooled)
  head = j32(batch["head"] if head is None else head)
  transfer = jnp.asarray(batch["transfer"] if transfer is None else transfer)
  jb = jax_batch(batch)

  def total(lp, po, hd):
    return obj.mcpo_loss(lp, po, None if cfg.algorithm == "grpo" else hd, jb, transfer, cfg)

  (loss, metrics), grads = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(logp, pooled, head)
  return loss, metrics, grads


def _torch_mcpo(batch, cfg, pooled=None, transfer=None):
  """(loss, metrics, gradients) of the reference loops run in float64 torch."""
  logp = torch.tensor(batch["logp"], dtype=torch.float64, requires_grad=True)
  pooled = torch.tensor(pooled_of(batch) if pooled is None else pooled, dtype=torch.float64, requires_grad=True)
  head = torch.tensor(batch["head"], dtype=torch.float64, requires_grad=True)
  loss, metrics = ref.mcpo_loss(logp, pooled, head, batch, batch["transfer"] if transfer is None else transfer, cfg)
  loss.backward()
  grads = tuple(np.zeros(t.shape) if t.grad is None else t.grad.numpy() for t in (logp, pooled, head))
  metrics = {k: (v if isinstance(v, list) else ref._value(v)) for k, v in metrics.items()}
  return ref._value(loss), metrics, grads


@pytest.mark.parametrize("overrides", MCPO_CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("spec", BATCHES[:2])
def test_mcpo_loss_values_and_gradients(spec, overrides):
  batch = make_batch(*spec)
  cfg = config(batch, **overrides)
  loss, metrics, grads = _jax_mcpo(batch, cfg)
  ref_loss, ref_metrics, ref_grads = _torch_mcpo(batch, cfg)
  numpy_loss, numpy_metrics = ref.mcpo_loss(batch["logp"], pooled_of(batch), batch["head"], batch,
                                            batch["transfer"], cfg)
  assert abs(numpy_loss - ref_loss) < 1e-12  # the NumPy and torch runs of the reference agree
  close(loss, numpy_loss, what="loss")
  close_metrics(metrics, numpy_metrics, MCPO_METRICS)
  if cfg.algorithm == "mcpo":
    close_metrics(metrics, numpy_metrics, CONTRASTIVE_METRICS)
    assert numpy_metrics["anchors"] > 0 and numpy_metrics["l_cross"] > 0
  else:
    assert set(metrics) == set(MCPO_METRICS) and float(metrics["contrastive"]) == 0.0
  if cfg.coupling == "reward" and cfg.algorithm == "mcpo":
    close(metrics["reward_bonus"], numpy_metrics["reward_bonus"], what="reward_bonus")
  for name, g, r in zip(("logp", "pooled", "head"), grads, ref_grads):
    close_grad(g, r, what=f"d loss / d {name}")
  assert np.all(np.asarray(grads[0])[batch["mask"] == 0] == 0.0)  # padding gets no gradient
  if cfg.algorithm == "mcpo" and cfg.repr_grad == "policy" and cfg.coupling == "loss":
    assert np.any(np.asarray(grads[1]) != 0.0)


@pytest.mark.parametrize("denominator", ["shared", "per_term"])
@pytest.mark.parametrize("spec", BATCHES)
def test_contrastive_gradient_wrt_z(spec, denominator):
  """d(λ_cross·L_cross + λ_in·L_in)/dz against torch autograd of the reference loops."""
  batch = make_batch(*spec)
  z = random_z(len(batch["correct"]), spec[-1])
  args = (batch["group_ids"], batch["domain_ids"], batch["correct"], batch["transfer"])
  knobs = dict(tau=0.05, cross_topk=2, negative_scope="batch", denominator=denominator)

  def jax_total(zz):
    l_cross, l_in, _, _ = obj.contrastive_loss(zz, *(jnp.asarray(a) for a in args), **knobs)
    return 0.3 * l_cross + 0.7 * l_in

  grad = jax.grad(jax_total)(j32(z))
  zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
  r_cross, r_in, _, _ = ref.contrastive_loss(zt, *args, **knobs)
  (0.3 * r_cross + 0.7 * r_in).backward()
  close_grad(grad, zt.grad.numpy(), what="d/dz")


# ---------------------------------------------------------------------------------------------- edges


def _edge_batch(case: str):
  """Variants of one random batch (3 domains with 2, 3, 3 prompts, G = 4) for the edge cases."""
  batch = make_batch(*EDGE_SPEC)
  g = batch["group_size"]
  correct = batch["correct"].copy()
  rewards = batch["rewards"].copy()
  transfer = batch["transfer"].copy()
  pooled = pooled_of(batch)
  if case == "all_correct_group":
    correct[:g], rewards[:g] = 1, 1.0
  elif case == "all_wrong_group":
    correct[g:2 * g], rewards[g:2 * g] = 0, 0.0
  elif case == "domain_without_correct":
    wrong = batch["domain_ids"] == 2
    correct[wrong], rewards[wrong] = 0, 0.0
  elif case == "all_wrong_batch":
    correct[:], rewards[:] = 0, 0.0
  elif case == "one_domain":
    batch["domain_ids"] = np.zeros_like(batch["domain_ids"])
    transfer = np.ones((1, 1), np.int32)
  elif case == "transfer_zeros":
    transfer = np.zeros_like(transfer)
  elif case == "empty_response":
    correct[0], rewards[0] = 1, 1.0  # an anchor whose response is empty: pooled 0, z 0
    batch["mask"] = batch["mask"].copy()
    batch["mask"][0] = 0
    pooled = pooled_of(batch)
  elif case == "group_size_1":
    batch["group_size"] = 1
  batch.update(correct=correct, rewards=rewards, transfer=transfer,
               advantages=_f32(ref.grpo_advantages(rewards, batch["group_size"])))
  return batch, pooled


EDGE_CASES = ["all_correct_group", "all_wrong_group", "domain_without_correct", "all_wrong_batch", "one_domain",
              "transfer_zeros", "empty_response", "group_size_1"]


@pytest.mark.parametrize("coupling", ["loss", "reward"])
@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_finite_and_exact(case, coupling):
  batch, pooled = _edge_batch(case)
  if case == "group_size_1" and coupling == "reward":  # recomputed group advantages need a real group
    with pytest.raises(ValueError, match="group_size"):
      config(batch, coupling=coupling)
    return
  cfg = config(batch, coupling=coupling)
  loss, metrics, grads = _jax_mcpo(batch, cfg, pooled=pooled)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(float(v)) for v in metrics.values())
  for name, g in zip(("logp", "pooled", "head"), grads):
    assert np.all(np.isfinite(np.asarray(g))), name
  ref_loss, ref_metrics, ref_grads = _torch_mcpo(batch, cfg, pooled=pooled)
  close(loss, ref_loss, what="loss")
  close_metrics(metrics, ref_metrics, MCPO_METRICS + CONTRASTIVE_METRICS)
  for name, g, r in zip(("logp", "pooled", "head"), grads, ref_grads):
    close_grad(g, r, what=f"{case} d/d{name}")
  if case in ("one_domain", "transfer_zeros", "all_wrong_batch"):
    assert float(metrics["l_cross"]) == 0.0 and float(metrics["cross_pos_per_anchor"]) == 0.0
  if case == "all_wrong_batch":
    assert float(metrics["contrastive"]) == 0.0 and float(metrics["anchors"]) == 0.0
    assert np.all(np.asarray(grads[2]) == 0.0)
  if case == "group_size_1":
    assert np.all(np.asarray(obj.grpo_advantages(j32(batch["rewards"]), 1)) == 0.0)
  if case == "all_correct_group":
    adv = np.asarray(obj.grpo_advantages(j32(batch["rewards"]), batch["group_size"]))
    assert np.all(adv[:batch["group_size"]] == 0.0)


# --------------------------------------------------------------------------------- gradient routing


def test_repr_grad_head_stops_gradient_at_pooled():
  """repr_grad="head": no contrastive gradient reaches pooled (nor any LLM parameter); the head learns."""
  batch = make_batch(*BATCHES[0])
  _, _, (g_logp, g_pooled, g_head) = _jax_mcpo(batch, config(batch, repr_grad="head"))
  assert np.all(np.asarray(g_pooled) == 0.0)
  assert np.any(np.asarray(g_head) != 0.0)
  _, _, (g_logp_grpo, _, _) = _jax_mcpo(batch, config(batch, algorithm="grpo"))
  np.testing.assert_array_equal(np.asarray(g_logp), np.asarray(g_logp_grpo))
  _, _, (_, g_pooled_policy, _) = _jax_mcpo(batch, config(batch))
  assert np.any(np.asarray(g_pooled_policy) != 0.0)  # the default does train the LLM through pooled

  # A tiny "LLM": hidden states and log-probs from one weight matrix. The head-mode total and the plain GRPO
  # total must give it exactly the same gradient: the contrastive term contributes exactly zero.
  rng = np.random.default_rng(11)
  n = len(batch["correct"])
  inputs = j32(_f32(rng.normal(size=(n, LENGTH, WIDTH))))
  llm = j32(_f32(rng.normal(size=(WIDTH, WIDTH)) / np.sqrt(WIDTH)))
  jb = jax_batch(batch)
  transfer = jnp.asarray(batch["transfer"])
  head = j32(batch["head"])

  def total(weights, cfg):
    hidden = jnp.tanh(inputs @ weights)  # [N, T, E]
    logp = -jax.nn.softplus(hidden[..., 0])  # [N, T]
    pooled = obj.pool_response(hidden, jb.mask)
    return obj.mcpo_loss(logp, pooled, None if cfg.algorithm == "grpo" else head, jb, transfer, cfg)[0]

  g_head_mode = jax.grad(total)(llm, config(batch, repr_grad="head"))
  g_grpo = jax.grad(total)(llm, config(batch, algorithm="grpo"))
  g_policy = jax.grad(total)(llm, config(batch))
  np.testing.assert_array_equal(np.asarray(g_head_mode), np.asarray(g_grpo))
  assert np.any(np.asarray(g_policy) != np.asarray(g_grpo))


def test_reward_coupling():
  """coupling="reward": the bonus clamp(−per_anchor, min −0.5) goes to correct rows only, advantages are the
  GRPO advantages of the bonus-added rewards, and only the head learns from the contrastive term."""
  batch = make_batch(*BATCHES[0])
  lam = 0.02  # per-anchor losses here are ~10-30 (τ = 0.05): a small λ puts −λ·L_i on both sides of −0.5
  cfg = config(batch, coupling="reward", lambda_cross=lam, lambda_in=lam)
  pooled = pooled_of(batch)
  loss, metrics, (g_logp, g_pooled, g_head) = _jax_mcpo(batch, cfg)
  assert np.all(np.asarray(g_pooled) == 0.0)
  assert np.any(np.asarray(g_head) != 0.0)

  # The bonus, from the JAX contrastive term of the same z.
  z = obj.project(j32(pooled), j32(batch["head"]))
  _, _, per_anchor, _ = obj.contrastive_loss(
      z, jnp.asarray(batch["group_ids"]), jnp.asarray(batch["domain_ids"]), jnp.asarray(batch["correct"]),
      jnp.asarray(batch["transfer"]), tau=cfg.tau, cross_topk=cfg.cross_topk, lambda_cross=lam, lambda_in=lam)
  bonus = np.maximum(-np.asarray(per_anchor), -0.5)
  _, ref_metrics = ref.mcpo_loss(batch["logp"], pooled, batch["head"], batch, batch["transfer"], cfg)
  close(bonus, ref_metrics["bonus"], what="bonus")
  assert np.all(bonus[batch["correct"] == 0] == 0.0)  # only anchors receive a bonus
  correct_bonus = bonus[batch["correct"] == 1]
  assert np.any(correct_bonus == -0.5) and np.any((correct_bonus < 0) & (correct_bonus > -0.5))  # clamp binds
  close(metrics["reward_bonus"], np.mean(bonus), what="reward_bonus")

  advantages = obj.grpo_advantages(j32(batch["rewards"]) + j32(bonus), batch["group_size"])
  close(advantages, ref_metrics["advantages"], what="advantages of rewards + bonus")
  pg_loss, _ = obj.policy_loss(j32(batch["logp"]), j32(batch["old_logp"]), advantages, jnp.asarray(batch["mask"]))
  close(metrics["pg_loss"], pg_loss, tol=1e-6, what="pg_loss uses the bonus advantages")
  close(metrics["pg_loss"], ref_metrics["pg_loss"], what="pg_loss vs reference")
  assert abs(float(metrics["pg_loss"]) - ref.policy_loss(batch["logp"], batch["old_logp"], batch["advantages"],
                                                          batch["mask"])[0]) > 1e-4  # the bonus matters

  # batch["advantages"] is ignored under reward coupling (they are recomputed from rewards + bonus).
  garbage = dict(batch, advantages=_f32(np.full_like(batch["advantages"], 7.0)))
  loss_garbage, _, _ = _jax_mcpo(garbage, cfg)
  assert float(loss_garbage) == float(loss)


# --------------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("agg", obj.AGGREGATIONS)
def test_micro_batches_sum_to_full_batch(agg):
  """4 row chunks with the global num_tokens / num_rows: partial losses add up to the full loss."""
  batch = make_batch(*BATCHES[2])
  n = len(batch["correct"])
  mask = batch["mask"].copy()
  mask[5] = 0  # an empty row still counts as a row
  values = j32(_f32(np.random.default_rng(3).normal(size=mask.shape)))
  num_tokens, num_rows = int(mask.sum()), n
  chunks = np.array_split(np.arange(n), 4)
  full = obj.aggregate_loss(values, jnp.asarray(mask), agg)
  parts = [obj.aggregate_loss(values[c], jnp.asarray(mask[c]), agg, num_tokens=num_tokens, num_rows=num_rows)
           for c in chunks]
  assert abs(float(sum(parts)) - float(full)) <= MICRO_TOL

  cfg = config(batch, algorithm="grpo", agg=agg)
  jb = jax_batch(dict(batch, mask=mask))
  full_loss, _ = obj.mcpo_loss(j32(batch["logp"]), None, None, jb, None, cfg)
  part_losses = []
  for c in chunks:
    part = jax.tree.map(lambda v: v[c], jb)
    part_losses.append(obj.mcpo_loss(j32(batch["logp"][c]), None, None, part, None, cfg,
                                     num_tokens=num_tokens, num_rows=num_rows)[0])
  assert abs(float(sum(part_losses)) - float(full_loss)) <= MICRO_TOL
  ref_parts = [ref.policy_loss(batch["logp"][c], batch["old_logp"][c], batch["advantages"][c], mask[c],
                               agg=agg, num_tokens=num_tokens, num_rows=num_rows)[0] for c in chunks]
  close(sum(ref_parts), ref.policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], mask, agg=agg)[0],
        tol=1e-12, what="reference micro-batches")


@pytest.mark.parametrize("coupling", ["loss", "reward"])
def test_split_terms_add_up(coupling):
  """contrastive_term + policy_term (the pieces a micro-batching trainer uses) give mcpo_loss, and
  policy_term over 4 row chunks with global counts adds up to its full-batch value."""
  batch = make_batch(*BATCHES[1])
  cfg = config(batch, coupling=coupling, lambda_cross=0.02, lambda_in=0.02)
  jb, pooled, head = jax_batch(batch), j32(pooled_of(batch)), j32(batch["head"])
  value, (advantages, _) = obj.contrastive_term(pooled, head, jb, jnp.asarray(batch["transfer"]), cfg)
  policy, _ = obj.policy_term(j32(batch["logp"]), jb, advantages, cfg)
  loss, metrics = obj.mcpo_loss(j32(batch["logp"]), pooled, head, jb, jnp.asarray(batch["transfer"]), cfg)
  close(policy + value, loss, tol=1e-6, what="policy_term + contrastive_term")
  _, ref_metrics = ref.mcpo_loss(batch["logp"], pooled_of(batch), batch["head"], batch, batch["transfer"], cfg)
  close(advantages, ref_metrics["advantages"], what="advantages")
  close(value, ref_metrics["contrastive"], what="contrastive_term")
  n = len(batch["correct"])
  num_tokens = int(batch["mask"].sum())
  parts = []
  for c in np.array_split(np.arange(n), 4):
    part = jax.tree.map(lambda v: v[c], jb)
    parts.append(obj.policy_term(j32(batch["logp"][c]), part, advantages[c], cfg, num_tokens=num_tokens,
                                 num_rows=n)[0])
  assert abs(float(sum(parts)) - float(policy)) <= MICRO_TOL


# ---------------------------------------------------------------------------------------------- errors


def test_bad_knobs_raise_clear_errors():
  values, mask = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match="agg"):
    obj.aggregate_loss(values, mask, "token-sum")
  with pytest.raises(ValueError, match="kl"):
    obj.kl_penalty(values, values, "k4")
  ids = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="in_domain_scope"):
    obj.contrastive_masks(ids, ids, ids, jnp.ones((1, 1)), in_domain_scope="batch")
  with pytest.raises(ValueError, match="negative_scope"):
    obj.contrastive_masks(ids, ids, ids, jnp.ones((1, 1)), negative_scope="domain")
  for field, value in [("coupling", "bonus"), ("repr_grad", "all"), ("agg", "mean"), ("algorithm", "ppo"),
                       ("denominator", "joint")]:
    with pytest.raises(ValueError, match=f"objective.{field}"):
      obj.ObjectiveConfig(**{field: value})
