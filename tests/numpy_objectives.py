"""An independent reference of the MCPO objective (docs/DESIGN.md §4), written with plain Python loops.

Written from docs/DESIGN.md §4 and the conventions stated in the docstrings of mcpo_jax/objectives.py,
not from its code: per-group loops for advantages, per-token loops for the clipped surrogate and
the KL, per-anchor / per-pair loops for the contrastive masks, an explicit sort for the top-k,
a stable log-sum-exp over the listed denominator set, and explicit anchor counting.

Every function computes scalar by scalar. With float64 NumPy inputs it is the NumPy reference; the
very same loops run on float64 torch tensors (rows are unbound into 0-d tensors), so torch autograd
of these formulas gives reference gradients. Stop-gradients are `_value(x)` / `.detach()`.
"""

from __future__ import annotations

import math

import numpy as np

try:
  import torch
except ImportError:  # the gradient reference needs torch; the value reference does not
  torch = None

LOG_RATIO_CLIP = 20.0  # DESIGN §4: log-ratio clipped to ±20 (ratio and k3)
K3_VALUE_CLIP = 10.0  # DESIGN §4: k3 value clipped to ±10
NORM_EPS_SQ = 1e-12  # project(): z = v / sqrt(max(|v|², 1e-12)), so a zero vector maps to zero


# ------------------------------------------------------------------------------------- scalar helpers


def _is_torch(x) -> bool:
  return torch is not None and isinstance(x, torch.Tensor)


def _exp(x):
  return torch.exp(x) if _is_torch(x) else math.exp(x)


def _log(x):
  return torch.log(x) if _is_torch(x) else math.log(x)


def _sqrt(x):
  return torch.sqrt(x) if _is_torch(x) else math.sqrt(x)


def _clip(x, low, high):
  """min(max(x, low), high) by comparisons: outside [low, high] it returns the constant (zero gradient)."""
  if x < low:
    return low
  if x > high:
    return high
  return x


def _value(x) -> float:
  """A plain float, the stop-gradient of a scalar."""
  return float(x.detach()) if _is_torch(x) else float(x)


def _stop(x):
  """Stop-gradient of an array (torch: detach; NumPy: itself)."""
  return x.detach() if _is_torch(x) else x


def _rows(array):
  """[N, K] -> list of N lists of K scalars (0-d tensors keep the autograd graph)."""
  if _is_torch(array):
    return [list(row.unbind(0)) for row in array.unbind(0)]
  return [[np.float64(v) for v in row] for row in np.asarray(array, np.float64)]


def _ints(array):
  return [int(v) for v in np.asarray(array).reshape(-1)]


# ------------------------------------------------------------------------------------------------ GRPO


def grpo_advantages(rewards, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> list:
  """Per group of `group_size` consecutive rows: (r − mean) / (unbiased std + eps); group size 1 -> 0."""
  rewards = [float(r) for r in np.asarray(rewards, np.float64).reshape(-1)]
  advantages = []
  for start in range(0, len(rewards), group_size):
    group = rewards[start:start + group_size]
    if len(group) == 1:
      advantages.append(0.0)
      continue
    mean = sum(group) / len(group)
    variance = sum((r - mean) ** 2 for r in group) / (len(group) - 1)
    for r in group:
      advantages.append((r - mean) / (math.sqrt(variance) + eps) if normalize_std else r - mean)
  return advantages


def aggregate(per_token, mask, agg: str, num_tokens=None, num_rows=None):
  """per_token: N lists of T scalars; mask [N, T] of 0/1. Loops over rows and tokens."""
  mask = np.asarray(mask).astype(bool)
  rows, length = mask.shape
  if num_rows is None:
    num_rows = rows
  if agg == "token-mean":
    total, count = 0.0, 0
    for i in range(rows):
      for t in range(length):
        if mask[i, t]:
          total = total + per_token[i][t]
          count += 1
    if num_tokens is None:
      num_tokens = count
    return total / max(num_tokens, 1)
  if agg == "seq-mean-token-mean":
    total = 0.0
    for i in range(rows):
      row_total, row_count = 0.0, 0
      for t in range(length):
        if mask[i, t]:
          row_total = row_total + per_token[i][t]
          row_count += 1
      total = total + row_total / max(row_count, 1)  # an empty row counts as a row with mean 0
    return total / num_rows
  if agg == "seq-mean-token-sum-norm":
    total = 0.0
    for i in range(rows):
      for t in range(length):
        if mask[i, t]:
          total = total + per_token[i][t]
    return total / (num_rows * length)  # Dr.GRPO: a constant divisor, rows × padded length
  raise ValueError(agg)


def policy_loss(logp, old_logp, advantages, mask, eps_low=0.2, eps_high=0.2, dual_clip=3.0, agg="token-mean",
                num_tokens=None, num_rows=None, ratio="token"):
  """Dual-clip PPO, token by token. ratio="sequence" (GSPO): each row's tokens share the row's log-ratio,
  the plain average of its response tokens' log π − log π_old (then clipped ±20). Returns (loss, metrics
  of plain floats)."""
  sequence = ratio == "sequence"
  logp_rows = _rows(logp)
  old_rows = [[float(v) for v in row] for row in np.asarray(old_logp, np.float64)]
  advantages = [float(a) for a in advantages]
  mask = np.asarray(mask).astype(bool)
  per_token = []
  clipped_count, lower_count, kl_sum, count = 0, 0, 0.0, 0
  for i, row in enumerate(logp_rows):
    a = advantages[i]
    values = []
    row_log_ratio = 0.0
    if sequence:
      response = [t for t in range(len(row)) if mask[i, t]]
      for t in response:
        row_log_ratio = row_log_ratio + (row[t] - old_rows[i][t])
      row_log_ratio = row_log_ratio / max(len(response), 1)
    for t, lp in enumerate(row):
      raw = row_log_ratio if sequence else lp - old_rows[i][t]
      log_ratio = _clip(raw, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
      ratio = _exp(log_ratio)
      unclipped = -a * ratio
      clipped = -a * _clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
      pessimistic = unclipped if unclipped >= clipped else clipped
      value = pessimistic
      dual_binds = False
      if a < 0 and pessimistic > -dual_clip * a:
        value = -dual_clip * a
        dual_binds = True
      values.append(value)
      if mask[i, t]:
        count += 1
        clipped_count += int(_value(clipped) > _value(unclipped))
        lower_count += int(dual_binds)
        kl_sum += -_value(log_ratio)
    per_token.append(values)
  loss = aggregate(per_token, mask, agg, num_tokens, num_rows)
  denominator = max(count, 1)
  metrics = {"pg_clipfrac": clipped_count / denominator, "pg_clipfrac_lower": lower_count / denominator,
             "ppo_kl": kl_sum / denominator}
  return loss, metrics


def kl_penalty(logp, ref_logp, kind="k3") -> list:
  """Per-token KL(π‖π_ref) estimators; k3 = (ρ − 1) − log ρ, ρ = π_ref/π, log ρ clipped ±20, value ±10."""
  ref_rows = [[float(v) for v in row] for row in np.asarray(ref_logp, np.float64)]
  out = []
  for i, row in enumerate(_rows(logp)):
    values = []
    for t, lp in enumerate(row):
      log_ratio = lp - ref_rows[i][t]  # log π − log π_ref
      if kind == "k1":
        values.append(log_ratio)
      elif kind == "k2":
        values.append(0.5 * log_ratio * log_ratio)
      elif kind == "k3":
        log_rho = _clip(-log_ratio, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
        values.append(_clip(_exp(log_rho) - log_rho - 1.0, -K3_VALUE_CLIP, K3_VALUE_CLIP))
      else:
        raise ValueError(kind)
    out.append(values)
  return out


# ------------------------------------------------------------------------------------ representations


def pool_response(hidden, mask) -> np.ndarray:
  """Masked mean over response tokens, row by row and feature by feature. [N, T, E] -> [N, E]."""
  hidden = np.asarray(hidden, np.float64)
  mask = np.asarray(mask).astype(bool)
  n, length, width = hidden.shape
  pooled = np.zeros((n, width))
  for i in range(n):
    count = sum(1 for t in range(length) if mask[i, t])
    for e in range(width):
      total = 0.0
      for t in range(length):
        if mask[i, t]:
          total += hidden[i, t, e]
      pooled[i, e] = total / max(count, 1)
  return pooled


def project(pooled, head) -> list:
  """z_i = normalize(W h_i): N lists of P scalars."""
  pooled_rows = _rows(pooled)
  head_cols = list(zip(*_rows(head)))  # P columns of E scalars
  z = []
  for h in pooled_rows:
    v = [sum((h[e] * col[e] for e in range(len(h))), 0.0) for col in head_cols]
    norm = _sqrt(max(sum((x * x for x in v), 0.0), NORM_EPS_SQ))
    z.append([x / norm for x in v])
  return z


# ----------------------------------------------------------------------------------------- contrastive


def contrastive_masks(group_ids, domain_ids, correct, transfer, in_domain_scope="domain",
                      negative_scope="prompt"):
  """Three N×N 0/1 lists (cross candidates X, in-domain positives I, negatives N), pair by pair.

  Rows of incorrect rows are empty: only correct rows are anchors.
  """
  p, d, c = _ints(group_ids), _ints(domain_ids), _ints(correct)
  transfer = np.asarray(transfer)
  n = len(p)
  cross = [[0] * n for _ in range(n)]
  in_domain = [[0] * n for _ in range(n)]
  negatives = [[0] * n for _ in range(n)]
  for i in range(n):
    if not c[i]:
      continue
    for j in range(n):
      if c[j] and d[i] != d[j] and transfer[d[i], d[j]] > 0:
        cross[i][j] = 1
      same_scope = d[i] == d[j] if in_domain_scope == "domain" else p[i] == p[j]
      if c[j] and same_scope and i != j:
        in_domain[i][j] = 1
      if not c[j] and (negative_scope == "batch" or p[i] == p[j]):
        negatives[i][j] = 1
  return cross, in_domain, negatives


def top_k(candidates: list[int], scores: dict[int, float], k: int) -> list[int]:
  """The candidates whose score is at least the k-th highest (ties at the k-th kept); k=0 keeps all."""
  if k <= 0 or len(candidates) <= k:
    return list(candidates)
  ranked = sorted((scores[j] for j in candidates), reverse=True)
  kth = ranked[k - 1]
  return [j for j in candidates if scores[j] >= kth]


def contrastive_loss(z, group_ids, domain_ids, correct, transfer, tau=0.05, cross_topk=4,
                     in_domain_scope="domain", negative_scope="prompt", require_negative=True,
                     lambda_cross=1.0, lambda_in=1.0, denominator="shared", details=False):
  """Supervised-contrastive MCPO term, anchor by anchor. z: N lists of P scalars (or an [N, P] array).

  Returns (l_cross, l_in, per_anchor list, metrics); with details=True also a dict of the per-anchor
  sets (kept cross positives, counted flags) for the tests.
  """
  if not isinstance(z, list):
    z = _rows(z)
  n = len(z)
  cross, in_domain, negatives = contrastive_masks(group_ids, domain_ids, correct, transfer,
                                                  in_domain_scope, negative_scope)
  cache = {}

  def cosine(i, j):
    if (i, j) not in cache:
      cache[(i, j)] = sum((z[i][q] * z[j][q] for q in range(len(z[i]))), 0.0)
    return cache[(i, j)]

  def sim(i, j):
    return cosine(i, j) / tau

  per_cross, per_in = [0.0] * n, [0.0] * n
  counted_cross, counted_in = [False] * n, [False] * n
  kept_cross = [[] for _ in range(n)]
  pos_cos, neg_cos, cross_positive_total = [], [], 0
  for i in range(n):
    candidates = [j for j in range(n) if cross[i][j]]
    in_positives = [j for j in range(n) if in_domain[i][j]]
    negative_set = [j for j in range(n) if negatives[i][j]]
    kept = top_k(candidates, {j: _value(sim(i, j)) for j in candidates}, cross_topk)  # stop-gradient ranking
    kept_cross[i] = kept
    has_negative = bool(negative_set) or not require_negative
    if denominator == "shared":  # one set for both terms
      cross_set = in_set = set(kept) | set(in_positives) | set(negative_set)
    else:  # "per_term": each term over its own positives and the negatives
      cross_set, in_set = set(kept) | set(negative_set), set(in_positives) | set(negative_set)

    def lse(members):
      shift = max(_value(sim(i, k)) for k in members)  # a constant: log-sum-exp is shift invariant
      return shift + _log(sum((_exp(sim(i, k) - shift) for k in sorted(members)), 0.0))

    if kept and has_negative:
      counted_cross[i] = True
      lse_cross = lse(cross_set)
      per_cross[i] = -sum((sim(i, j) - lse_cross for j in kept), 0.0) / len(kept)
      pos_cos += [_value(cosine(i, j)) for j in kept]
      cross_positive_total += len(kept)
    if in_positives and has_negative:
      counted_in[i] = True
      lse_in = lse(in_set)
      per_in[i] = -sum((sim(i, j) - lse_in for j in in_positives), 0.0) / len(in_positives)
      pos_cos += [_value(cosine(i, j)) for j in in_positives]
    if counted_cross[i] or counted_in[i]:
      neg_cos += [_value(cosine(i, j)) for j in negative_set]
  n_cross, n_in = sum(counted_cross), sum(counted_in)
  l_cross = sum((per_cross[i] for i in range(n) if counted_cross[i]), 0.0) / max(n_cross, 1)
  l_in = sum((per_in[i] for i in range(n) if counted_in[i]), 0.0) / max(n_in, 1)
  per_anchor = [lambda_cross * per_cross[i] + lambda_in * per_in[i] for i in range(n)]
  metrics = {
      "pos_sim": sum(pos_cos) / max(len(pos_cos), 1),
      "neg_sim": sum(neg_cos) / max(len(neg_cos), 1),
      "anchors": float(sum(1 for i in range(n) if counted_cross[i] or counted_in[i])),
      "cross_pos_per_anchor": cross_positive_total / max(n_cross, 1),
  }
  if details:
    return l_cross, l_in, per_anchor, metrics, {"kept_cross": kept_cross, "counted_cross": counted_cross,
                                                 "counted_in": counted_in}
  return l_cross, l_in, per_anchor, metrics


# --------------------------------------------------------------------------------------------- total


def mcpo_loss(logp, pooled, head, batch, transfer, config, num_tokens=None, num_rows=None):
  """L = L_GRPO + β·KL + λ_cross·L_cross + λ_in·L_in, or the reward-coupled form. Returns (loss, metrics).

  `config` is read attribute by attribute (an ObjectiveConfig is plain data). metrics also holds
  "bonus" (the per-row reward bonus) and "advantages" (the advantages used) for the tests.
  """
  advantages = [float(a) for a in np.asarray(batch["advantages"], np.float64)]
  metrics = {}
  contrastive = 0.0
  if config.algorithm == "mcpo":
    if config.repr_grad == "head" or config.coupling == "reward":
      pooled = _stop(pooled)
    z = project(pooled, head)
    l_cross, l_in, per_anchor, contrastive_metrics = contrastive_loss(
        z, batch["group_ids"], batch["domain_ids"], batch["correct"], transfer, config.tau, config.cross_topk,
        config.in_domain_scope, config.negative_scope, config.require_negative, config.lambda_cross,
        config.lambda_in, config.denominator)
    contrastive = config.lambda_cross * l_cross + config.lambda_in * l_in
    metrics.update(contrastive_metrics, l_cross=l_cross, l_in=l_in)
    if config.coupling == "reward":
      correct = _ints(batch["correct"])
      bonus = []
      for i, value in enumerate(per_anchor):
        bonus.append(max(-_value(value), config.reward_bonus_min) if correct[i] else 0.0)
      rewards = [float(r) + b for r, b in zip(np.asarray(batch["rewards"], np.float64), bonus)]
      advantages = grpo_advantages(rewards, config.group_size, config.normalize_std)
      metrics["reward_bonus"] = sum(bonus) / len(bonus)
      metrics["bonus"] = bonus
  metrics["advantages"] = advantages
  pg_loss, pg_metrics = policy_loss(logp, batch["old_logp"], advantages, batch["mask"], config.eps_low,
                                    config.eps_high, config.dual_clip, config.agg, num_tokens, num_rows)
  kl = aggregate(kl_penalty(logp, batch["ref_logp"], config.kl_kind), batch["mask"], config.agg, num_tokens,
                 num_rows)
  loss = pg_loss + config.kl_coef * kl + contrastive
  metrics.update(pg_metrics, pg_loss=pg_loss, kl=kl, contrastive=contrastive, loss=loss)
  return loss, metrics
