"""The MCPO objective as pure functions: GRPO advantages, clipped policy loss, KL, contrastive term.

Our precise reading of MCPO is docs/DESIGN.md §4; every choice below is a keyword argument. Everything
is computed in float32. Shapes: N = B·G rows (rows of a prompt consecutive), T response tokens,
E hidden width, P projection width, D domains.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mcpo_jax.batch import TrainBatch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")
DENOMINATORS = ("shared", "per_term")
RATIOS = ("token", "sequence")  # importance ratio per token (GRPO) or per sequence (GSPO)
LOG_RATIO_CLIP = 20.0
K3_VALUE_CLIP = 10.0


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


# ---------------------------------------------------------------------------------------------
# GRPO


def grpo_advantages(rewards: jax.Array, group_size: int, *, normalize_std: bool = True,
                    eps: float = 1e-6) -> jax.Array:
  """(r − group mean) / (unbiased group std + eps); without the division it is Dr.GRPO. [N] -> [N]."""
  rewards = rewards.astype(jnp.float32)
  if group_size == 1:
    return jnp.zeros_like(rewards)
  groups = rewards.reshape(-1, group_size)  # [B, G]
  centered = groups - jnp.mean(groups, axis=1, keepdims=True)
  if normalize_std:
    centered = centered / (jnp.std(groups, axis=1, ddof=1, keepdims=True) + eps)
  return centered.reshape(-1)


def aggregate_loss(per_token: jax.Array, mask: jax.Array, agg: str, *, num_tokens: Any = None,
                   num_rows: Any = None) -> jax.Array:
  """Reduces a [N, T] loss to a scalar.

  token-mean: Σ loss / number of response tokens; seq-mean-token-mean: mean over rows of each row's
  token mean; seq-mean-token-sum-norm (Dr.GRPO): Σ loss / (rows · T), T the padded response length,
  a constant. `num_tokens` / `num_rows` override the denominators with global counts, so that the
  losses of micro-batches add up exactly to the loss of the whole batch.
  """
  mask = mask.astype(bool)
  masked = jnp.where(mask, per_token, 0.0)
  rows = per_token.shape[0] if num_rows is None else num_rows
  if agg == "token-mean":
    tokens = jnp.sum(mask) if num_tokens is None else num_tokens
    return jnp.sum(masked) / jnp.maximum(tokens, 1)
  if agg == "seq-mean-token-mean":
    row_means = jnp.sum(masked, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
    return jnp.sum(row_means) / jnp.maximum(rows, 1)
  if agg == "seq-mean-token-sum-norm":
    return jnp.sum(masked) / (jnp.maximum(rows, 1) * per_token.shape[1])
  raise ValueError(f"agg={agg!r}; choose one of {AGGREGATIONS}.")


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float = 3.0, agg: str = "token-mean",
                ratio: str = "token", num_tokens: Any = None,
                num_rows: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dual-clip PPO surrogate. logp, old_logp, mask: [N, T]; advantages: [N].

  Per token: max(−Aρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), and for A < 0 at most −c·A (c = dual_clip).
  ratio="token": ρ_t = π(y_t)/π_old(y_t) (GRPO); "sequence" (GSPO, arXiv 2507.18071): every token of a
  row takes the row's length-normalised ratio s = exp(mean_t log ρ_t), the geometric mean of its token
  ratios, so the row is clipped as a whole (GSPO uses ε near 3e-4..4e-4 and agg "seq-mean-token-mean").
  The log-ratio is clipped to ±20 (per token, or the row's mean). Metrics (token means): pg_clipfrac
  (the clipped branch is taken), pg_clipfrac_lower (the dual clip binds), ppo_kl (mean of −log ρ).
  """
  mask = mask.astype(bool)
  if ratio not in RATIOS:
    raise ValueError(f"ratio={ratio!r}; choose one of {list(RATIOS)}.")
  token_log_ratio = jnp.where(mask, logp - old_logp, 0.0)  # [N, T]; padding may hold anything
  if ratio == "sequence":
    row_mean = jnp.sum(token_log_ratio, axis=1, keepdims=True) / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
    token_log_ratio = jnp.broadcast_to(row_mean, logp.shape)  # [N, 1] -> [N, T]
  log_ratio = jnp.clip(token_log_ratio, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
  ratio = jnp.exp(log_ratio)
  adv = advantages.astype(jnp.float32)[:, None]  # [N, 1]
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pessimistic = jnp.maximum(unclipped, clipped)
  dual_bound = -adv * dual_clip
  per_token = jnp.where(adv < 0, jnp.minimum(pessimistic, dual_bound), pessimistic)
  loss = aggregate_loss(per_token, mask, agg, num_tokens=num_tokens, num_rows=num_rows)
  metrics = {
      "pg_clipfrac": _masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      "pg_clipfrac_lower": _masked_mean(((pessimistic > dual_bound) & (adv < 0)).astype(jnp.float32), mask),
      "ppo_kl": _masked_mean(-log_ratio, mask),
  }
  return loss, metrics


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3") -> jax.Array:
  """Per-token estimate of KL(π ‖ π_ref) from samples of π. [N, T] -> [N, T].

  k1 = log r, k2 = ½ (log r)², k3 = (ρ − 1) − log ρ with ρ = π_ref/π (unbiased, low variance);
  for k3 the log-ratio is clipped to ±20 and the value to ±10 to keep a stale token from exploding.
  """
  log_ratio = logp - ref_logp
  if kind == "k1":
    return log_ratio
  if kind == "k2":
    return 0.5 * jnp.square(log_ratio)
  if kind == "k3":
    ref_over_policy = jnp.clip(-log_ratio, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return jnp.clip(jnp.exp(ref_over_policy) - ref_over_policy - 1.0, -K3_VALUE_CLIP, K3_VALUE_CLIP)
  raise ValueError(f"kl kind={kind!r}; choose one of {KL_KINDS}.")


# ---------------------------------------------------------------------------------------------
# Representations and the contrastive term


def pool_response(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked mean over response tokens of the final normed hidden state. [N, T, E], [N, T] -> [N, E]."""
  weights = mask.astype(jnp.float32)[..., None]
  return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def project(pooled: jax.Array, head: jax.Array) -> jax.Array:
  """The contrastive head: bias-free linear map then L2 normalisation. [N, E] @ [E, P] -> [N, P]."""
  z = pooled.astype(jnp.float32) @ head.astype(jnp.float32)
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))


def contrastive_masks(group_ids: jax.Array, domain_ids: jax.Array, correct: jax.Array, transfer: jax.Array, *,
                      in_domain_scope: str = "domain", negative_scope: str = "prompt", in_loss: jax.Array | None = None):
  """The N×N pair masks, by broadcasting. Returns (cross candidates, in-domain positives, negatives).

  cross[i, j] = c_i c_j [d_i ≠ d_j] T[d_i, d_j];  in[i, j] = c_i c_j [same domain (or prompt)] [i ≠ j];
  neg[i, j] = c_i (1 − c_j) [p_i = p_j] (or any row of the batch with negative_scope="batch").
  Only correct rows are anchors, so every row i of the masks is empty for incorrect i. in_loss [N]
  (TrainBatch.in_loss; None = every row): a row outside the loss is in no pair at all.
  """
  member = jnp.ones(correct.shape, bool) if in_loss is None else in_loss.astype(bool)
  c = correct.astype(bool) & member
  both_correct = c[:, None] & c[None, :]
  same_domain = domain_ids[:, None] == domain_ids[None, :]
  same_prompt = group_ids[:, None] == group_ids[None, :]
  allowed = transfer[domain_ids[:, None], domain_ids[None, :]] > 0
  cross = both_correct & ~same_domain & allowed
  if in_domain_scope not in ("domain", "prompt"):
    raise ValueError(f"in_domain_scope={in_domain_scope!r}; choose 'domain' or 'prompt'.")
  scope = same_domain if in_domain_scope == "domain" else same_prompt
  in_domain = both_correct & scope & ~jnp.eye(c.shape[0], dtype=bool)
  if negative_scope not in ("prompt", "batch"):
    raise ValueError(f"negative_scope={negative_scope!r}; choose 'prompt' or 'batch'.")
  negatives = c[:, None] & ~c[None, :] & member[None, :]
  if negative_scope == "prompt":
    negatives = negatives & same_prompt
  return cross, in_domain, negatives


def counted_anchors(positives: jax.Array, negatives: jax.Array, require_negative: bool) -> jax.Array:
  """[N] bool: rows that count as anchors for a term: a positive, and a negative if require_negative."""
  has_negative = jnp.any(negatives, axis=1) if require_negative else True
  return jnp.any(positives, axis=1) & has_negative


def has_anchor(batch: TrainBatch, transfer: jax.Array, config: "ObjectiveConfig") -> jax.Array:
  """[] bool: whether any row counts as an anchor. The masks alone decide it, not z (top-k keeps at least
  one cross candidate of a non-empty row): without an anchor the contrastive term and all its gradients
  are exactly zero, whatever the representations are."""
  cross, in_domain, negatives = contrastive_masks(batch.group_ids, batch.domain_ids, batch.correct, transfer,
                                                  in_domain_scope=config.in_domain_scope,
                                                  negative_scope=config.negative_scope, in_loss=batch.in_loss)
  return jnp.any(counted_anchors(cross | in_domain, negatives, config.require_negative))


def top_k_per_row(candidates: jax.Array, scores: jax.Array, k: int) -> jax.Array:
  """Keeps, in each row, the k candidates with the highest score (ties at the k-th score kept)."""
  if k <= 0 or k >= candidates.shape[1]:
    return candidates
  masked = jnp.where(candidates, scores, -jnp.inf)
  kth = jax.lax.top_k(masked, k)[0][:, -1:]  # -inf when a row has fewer than k candidates
  return candidates & (masked >= kth)


def _supcon_rows(sim: jax.Array, positives: jax.Array, denominator: jax.Array) -> jax.Array:
  """Per row: −mean over positives j of [s_ij − logsumexp_{k ∈ denominator_i} s_ik]; 0 without positives."""
  has_any = jnp.any(denominator, axis=1)
  masked = jnp.where(denominator, sim, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.where(has_any, jnp.max(masked, axis=1), 0.0))
  total = jnp.sum(jnp.exp(masked - row_max[:, None]), axis=1)  # exp(-inf) = 0 outside the set
  lse = row_max + jnp.log(jnp.where(has_any, total, 1.0))  # [N]
  num_pos = jnp.sum(positives, axis=1)
  log_probs = jnp.where(positives, sim - lse[:, None], 0.0)
  return -jnp.sum(log_probs, axis=1) / jnp.maximum(num_pos, 1)


def contrastive_loss(z: jax.Array, group_ids: jax.Array, domain_ids: jax.Array, correct: jax.Array,
                     transfer: jax.Array, *, tau: float = 0.05, cross_topk: int = 4, in_domain_scope: str = "domain",
                     negative_scope: str = "prompt", require_negative: bool = True, lambda_cross: float = 1.0,
                     lambda_in: float = 1.0, denominator: str = "shared", in_loss: jax.Array | None = None):
  """Supervised-contrastive MCPO term over normalised representations z [N, P].

  For a correct anchor i the positives are its top-`cross_topk` cross-domain candidates (by
  stop-gradient similarity) for L_cross and its in-domain positives for L_in. denominator="shared":
  both terms' log-sum-exp run over X'_i ∪ I_i ∪ N_i (so each term also pushes the other's positives
  away); "per_term": L_cross over X'_i ∪ N_i and L_in over I_i ∪ N_i, so that λ_in = 0 or
  λ_cross = 0 removes one kind of pull and nothing else. An anchor counts for a term when it has a
  positive for that term (and a negative, if require_negative). Returns (l_cross, l_in, per_anchor [N], metrics), where
  l_* are means over counted anchors (0 when none) and per_anchor = λ_cross·L_cross_i + λ_in·L_in_i.
  Metrics: pos_sim / neg_sim are mean cosines over the positive / negative pairs of counted anchors,
  anchors counts anchors counted for either term, cross_pos_per_anchor is |X'_i| averaged over the
  anchors counted for the cross term. in_loss [N] (None = every row): rows outside the loss are in no pair.
  """
  z = z.astype(jnp.float32)
  sim = (z @ z.T) / tau  # [N, N]
  cross, in_domain, negatives = contrastive_masks(group_ids, domain_ids, correct, transfer,
                                                  in_domain_scope=in_domain_scope, negative_scope=negative_scope,
                                                  in_loss=in_loss)
  cross = top_k_per_row(cross, jax.lax.stop_gradient(sim), cross_topk)
  if denominator == "shared":
    cross_set = in_set = cross | in_domain | negatives
  elif denominator == "per_term":
    cross_set, in_set = cross | negatives, in_domain | negatives
  else:
    raise ValueError(f"denominator={denominator!r}; choose one of {DENOMINATORS}.")
  counts_cross = counted_anchors(cross, negatives, require_negative)  # [N]
  counts_in = counted_anchors(in_domain, negatives, require_negative)
  per_cross = jnp.where(counts_cross, _supcon_rows(sim, cross, cross_set), 0.0)
  per_in = jnp.where(counts_in, _supcon_rows(sim, in_domain, in_set), 0.0)
  l_cross = jnp.sum(per_cross) / jnp.maximum(jnp.sum(counts_cross), 1)
  l_in = jnp.sum(per_in) / jnp.maximum(jnp.sum(counts_in), 1)

  counted = counts_cross | counts_in
  cosine = sim * tau
  positive_pairs = ((cross & counts_cross[:, None]) | (in_domain & counts_in[:, None]))
  metrics = {
      "pos_sim": _masked_mean(cosine, positive_pairs),
      "neg_sim": _masked_mean(cosine, negatives & counted[:, None]),
      "anchors": jnp.sum(counted).astype(jnp.float32),
      "cross_pos_per_anchor": jnp.sum(jnp.where(counts_cross[:, None], cross, False)) /
                              jnp.maximum(jnp.sum(counts_cross), 1),
  }
  return l_cross, l_in, lambda_cross * per_cross + lambda_in * per_in, metrics


# ---------------------------------------------------------------------------------------------
# The total


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  algorithm: str = "mcpo"  # "mcpo" | "grpo" (no head, no contrastive term)
  eps_low: float = 0.2
  eps_high: float = 0.2
  dual_clip: float = 3.0
  agg: str = "token-mean"
  ratio: str = "token"  # "token" (GRPO) | "sequence" (GSPO: the row's geometric-mean ratio, clipped per row)
  kl_kind: str = "k3"
  kl_coef: float = 0.001
  tau: float = 0.05
  cross_topk: int = 4
  in_domain_scope: str = "domain"
  negative_scope: str = "prompt"
  require_negative: bool = True
  lambda_cross: float = 0.1
  lambda_in: float = 0.1
  denominator: str = "shared"  # "shared" | "per_term" (see contrastive_loss)
  coupling: str = "loss"  # "loss" | "reward" (CLIPO-style bonus; only the head learns from L)
  repr_grad: str = "policy"  # "policy" | "head" (stop the contrastive gradient at h)
  reward_bonus_min: float = -0.5
  normalize_std: bool = True
  group_size: int = 1  # G rollouts per prompt (the run's rollout.group_size)
  proj_dim: int = 256  # width of the contrastive head's projection
  head_warmup_steps: int = 0  # RL steps that train the contrastive head alone first
  # Anchor domain -> the domains whose correct rollouts may be its positives; unlisted anchors: all.
  transfer: tuple[tuple[str, tuple[str, ...]], ...] = ()

  def __post_init__(self):
    choices = {"algorithm": ("mcpo", "grpo"), "agg": AGGREGATIONS, "kl_kind": KL_KINDS,
               "coupling": ("loss", "reward"), "repr_grad": ("policy", "head"),
               "in_domain_scope": ("domain", "prompt"), "negative_scope": ("prompt", "batch"),
               "denominator": DENOMINATORS, "ratio": RATIOS}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"objective.{name}={getattr(self, name)!r}; choose one of {list(allowed)}.")
    if self.coupling == "reward" and self.algorithm == "mcpo" and self.group_size < 2:
      raise ValueError(f"objective.group_size={self.group_size}: coupling='reward' recomputes group advantages, so "
                       "set group_size to the rollouts per prompt (>= 2).")


def contrastive_term(pooled: jax.Array, head: jax.Array, batch: TrainBatch, transfer: jax.Array,
                     config: ObjectiveConfig) -> tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]:
  """The batch-global part of MCPO: λ_cross·L_cross + λ_in·L_in, and the advantages the policy term uses.

  It couples every pair of rows, so a trainer that splits the batch into micro-batches evaluates it
  once on all pooled representations and feeds its gradient back per micro-batch (gradient caching).
  Returns (value, (advantages [N], metrics)).
  """
  if config.repr_grad == "head" or config.coupling == "reward":
    pooled = jax.lax.stop_gradient(pooled)  # the LLM gets no gradient from the contrastive term
  z = project(pooled, head)
  l_cross, l_in, per_anchor, metrics = contrastive_loss(
      z, batch.group_ids, batch.domain_ids, batch.correct, transfer, tau=config.tau,
      cross_topk=config.cross_topk, in_domain_scope=config.in_domain_scope, negative_scope=config.negative_scope,
      require_negative=config.require_negative, lambda_cross=config.lambda_cross, lambda_in=config.lambda_in,
      denominator=config.denominator, in_loss=batch.in_loss)
  value = config.lambda_cross * l_cross + config.lambda_in * l_in
  metrics = dict(metrics, l_cross=l_cross, l_in=l_in, contrastive=value)
  advantages = batch.advantages
  if config.coupling == "reward":
    bonus = jnp.maximum(-jax.lax.stop_gradient(per_anchor), config.reward_bonus_min)  # 0 for non-anchors
    advantages = grpo_advantages(batch.rewards + bonus, config.group_size, normalize_std=config.normalize_std)
    metrics["reward_bonus"] = jnp.mean(bonus)
  return value, (advantages, metrics)


def policy_term(logp: jax.Array, batch: TrainBatch, advantages: jax.Array, config: ObjectiveConfig, *,
                num_tokens: Any = None, num_rows: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped GRPO + β·KL to the reference over the rows in the loss (TrainBatch.loss_mask); row-separable,
  so micro-batches sum to the batch value."""
  mask = batch.loss_mask.astype(bool)
  num_rows = batch.loss_rows if num_rows is None else num_rows
  pg_loss, metrics = policy_loss(logp, batch.old_logp, advantages, mask, eps_low=config.eps_low,
                                 eps_high=config.eps_high, dual_clip=config.dual_clip, agg=config.agg,
                                 ratio=config.ratio, num_tokens=num_tokens, num_rows=num_rows)
  kl = aggregate_loss(kl_penalty(logp, batch.ref_logp, config.kl_kind), mask, config.agg,
                      num_tokens=num_tokens, num_rows=num_rows)
  return pg_loss + config.kl_coef * kl, dict(metrics, pg_loss=pg_loss, kl=kl)


def mcpo_loss(logp: jax.Array, pooled: jax.Array, head: jax.Array | None, batch: TrainBatch,
              transfer: jax.Array, config: ObjectiveConfig, *, num_tokens: Any = None,
              num_rows: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = L_GRPO + β·KL + λ_cross·L_cross + λ_in·L_in (or, with coupling="reward", the bonus form).

  logp [N, T]: current log-probs; pooled [N, E]: pool_response of the same forward's hidden states;
  head [E, P]: the contrastive head (None for GRPO). batch: old_logp, ref_logp, mask [N, T];
  advantages, rewards, group_ids, domain_ids, correct [N] (a TrainBatch).
  """
  contrastive, advantages, metrics = jnp.zeros((), jnp.float32), batch.advantages, {}
  if config.algorithm == "mcpo":
    contrastive, (advantages, metrics) = contrastive_term(pooled, head, batch, transfer, config)
  policy, policy_metrics = policy_term(logp, batch, advantages, config, num_tokens=num_tokens, num_rows=num_rows)
  loss = policy + contrastive
  return loss, dict(metrics, **policy_metrics, contrastive=contrastive, loss=loss)
