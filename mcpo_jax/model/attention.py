"""Attention cores: dense over a KV cache (sampling; rows of one prompt read its keys once, not a copy each; the
cache in the compute dtype or int8 with a scale per slot), blockwise causal with a recomputing VJP (training).

Both take queries grouped by KV head, so each product is a plain batched matmul over (B, K) with no
copy of the keys: q [B, K, G, T, D] (G = H / K query heads per KV head), k, v [B, K, S, D].

The training path (no cache; queries at slots F..F+T-1 over S = F + T keys, F = 0 for plain
self-attention and F = P when the keys start with a shared prompt's) never keeps a [T, S] matrix: a lax.scan goes
over query blocks and keeps just the output and the per-query log-sum-exp; the backward scans the
blocks again and recomputes each block's probabilities from them (the flash-attention recipe, in
plain XLA). Activation memory is therefore linear in T. The scan matters: with the blocks unrolled
in Python (each against its causal prefix of keys, half the score FLOPs) or with jax.checkpoint
around a dense core, XLA:CPU kept O(T·S) of every layer alive until the backward pass (a 10-layer
probe planned 213 MB at T = 192 and 1113 MB at T = 576; this scan plans 170 and 507 MB).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = jnp.finfo(jnp.float32).min  # a finite fill, so a row with no visible key stays finite


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 with one scale per vector: x [..., D] ≈ int8 [..., D] · scale [..., None], scale float32 [...]
  = max |x| / 127 (an all-zero vector gets scale 0). Each entry is off by at most scale / 2."""
  scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127.0
  steps = jnp.round(x.astype(jnp.float32) / jnp.where(scale > 0, scale, 1.0)[..., None])
  return jnp.clip(steps, -127, 127).astype(jnp.int8), scale


def _masked_scores(q: jax.Array, k: jax.Array, query_slots: jax.Array, key_mask: jax.Array, groups: int,
                   key_scales: jax.Array | None = None):
  """Scores [B, K, G·Q, S] float32 with the keys a query may not see filled, and that mask [B, 1, G·Q, S].

  q: [B, K, G·Q, D] (group-major); k: [B, K, S, D]; query_slots: [Q] int; key_mask: [B, S] bool.
  key_scales: [B, K, S] float32 when k holds int8 steps (quantize_int8): a key's scale multiplies its scores.
  A query sees the real slots at or before its own.
  """
  d = q.shape[-1]
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
  if key_scales is not None:
    scores = scores * key_scales[:, :, None, :]
  allowed = (jnp.arange(k.shape[2])[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]  # [B, Q, S]
  allowed = jnp.tile(allowed, (1, groups, 1))[:, None]  # [B, 1, G·Q, S]
  return jnp.where(allowed, scores, _MASKED), allowed


def _weighted(probs: jax.Array, value_scales: jax.Array | None, dtype) -> jax.Array:
  """Attention weights [B, K, Q, S] for values held as int8 steps: each times its value's scale [B, K, S]."""
  return (probs if value_scales is None else probs * value_scales[:, :, None, :]).astype(dtype)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, query_slots: jax.Array, key_mask: jax.Array,
                     key_scales: jax.Array | None = None, value_scales: jax.Array | None = None) -> jax.Array:
  """Dense attention of T queries over S cache slots.

  q: [B, K, G, T, D]; k, v: [B, K, S, D]; query_slots: [T] int (slot of each query); key_mask: [B, S]
  bool. A query sees the real slots at or before its own. key_scales, value_scales: [B, K, S] float32 when k, v
  hold an int8 cache's steps (in q's dtype): slot s's key is k[..., s, :] · key_scales[..., s], so its scores are
  scaled after the product and its value's weight before the second one. Returns [B, K, G, T, D].
  """
  b, kv, g, t, d = q.shape
  scores, _ = _masked_scores(q.reshape(b, kv, g * t, d), k, query_slots, key_mask, g, key_scales)
  probs = _weighted(jax.nn.softmax(scores, axis=-1), value_scales, q.dtype)
  return jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv, g, t, d)


def grouped_cached_attention(q: jax.Array, prompt_k: jax.Array, prompt_v: jax.Array, prompt_mask: jax.Array,
                             k: jax.Array, v: jax.Array, query_slots: jax.Array, key_mask: jax.Array,
                             key_scales: jax.Array | None = None, value_scales: jax.Array | None = None) -> jax.Array:
  """cached_attention of rows that continue a shared prompt: each row's queries see its prompt's keys (held once
  per prompt, not copied into every row) and then its own cache slots, under one softmax.

  q: [N, K, G, T, D] with N = B·R rows, rows r·R .. r·R + R − 1 continuing prompt r; prompt_k, prompt_v:
  [B, K, P, D]; prompt_mask: [B, P] bool; k, v: [N, K, S, D]; query_slots: [T] int (each query's own-cache
  slot); key_mask: [N, S] bool; key_scales, value_scales: [N, K, S] for an int8 own cache (as cached_attention's;
  the prompts' keys stay in q's dtype). Returns [N, K, G, T, D].
  """
  n, kv, g, t, d = q.shape
  b, p = prompt_k.shape[0], prompt_k.shape[2]
  own, _ = _masked_scores(q.reshape(n, kv, g * t, d), k, query_slots, key_mask, g, key_scales)  # [N, K, G·T, S]
  by_prompt = q.reshape(b, n // b, kv, g * t, d)  # [B, R, K, G·T, D]: a prompt's rows share its keys
  shared = jnp.einsum("brkqd,bksd->brkqs", by_prompt, prompt_k, preferred_element_type=jnp.float32) * (d ** -0.5)
  shared = jnp.where(prompt_mask[:, None, None, None, :], shared, _MASKED).reshape(n, kv, g * t, p)
  probs = jax.nn.softmax(jnp.concatenate([shared, own], axis=-1), axis=-1)  # [N, K, G·T, P + S] float32
  from_prompt = jnp.einsum("brkqs,bksd->brkqd", probs[..., :p].astype(q.dtype).reshape(b, n // b, kv, g * t, p),
                           prompt_v, preferred_element_type=jnp.float32).reshape(n, kv, g * t, d)
  from_own = jnp.einsum("bkqs,bksd->bkqd", _weighted(probs[..., p:], value_scales, q.dtype), v,
                        preferred_element_type=jnp.float32)
  return (from_prompt + from_own).astype(q.dtype).reshape(n, kv, g, t, d)


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, K, G, T, ...] -> [T/Q, B, K, G·Q, ...], T zero-padded to a multiple of the block Q."""
  b, kv, g, t = x.shape[:4]
  x = jnp.pad(x, [(0, 0)] * 3 + [(0, -t % block)] + [(0, 0)] * (x.ndim - 4))
  n = x.shape[3] // block
  x = x.reshape(b, kv, g, n, block, *x.shape[4:])
  return jnp.moveaxis(x, 3, 0).reshape(n, b, kv, g * block, *x.shape[5:])


def _from_blocks(x: jax.Array, groups: int, length: int) -> jax.Array:
  """Inverse of _to_blocks: [T/Q, B, K, G·Q, ...] -> [B, K, G, T, ...]."""
  n, b, kv, gq = x.shape[:4]
  x = x.reshape(n, b, kv, groups, gq // groups, *x.shape[4:])
  return jnp.moveaxis(x, 0, 3).reshape(b, kv, groups, n * (gq // groups), *x.shape[5:])[:, :, :, :length]


def _block_scores(q_block, k, key_mask, start, groups):
  """_masked_scores of the block of queries at slots start, start + 1, ... (q_block: [B, K, G·Q, D])."""
  return _masked_scores(q_block, k, start + jnp.arange(q_block.shape[2] // groups), key_mask, groups)


def _causal_forward(q, k, v, key_mask, block, first_slot):
  groups, t = q.shape[2], q.shape[3]

  def one_block(_, inputs):
    index, q_block = inputs
    scores, _ = _block_scores(q_block, k, key_mask, first_slot + index * block, groups)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, G·Q]
    probs = jnp.exp(scores - lse[..., None]).astype(q.dtype)
    return None, (jnp.einsum("bkqs,bksd->bkqd", probs, v), lse)

  q_blocks = _to_blocks(q, block)
  _, (out, lse) = jax.lax.scan(one_block, None, (jnp.arange(q_blocks.shape[0]), q_blocks))
  return _from_blocks(out, groups, t), _from_blocks(lse, groups, t)  # [B, K, G, T, D], [B, K, G, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, block: int,
                     first_slot: int = 0) -> jax.Array:
  """Causal attention of T queries at slots F..F+T-1 (F = first_slot) over S = F + T keys, in query blocks.

  q: [B, K, G, T, D]; k, v: [B, K, S, D]; key_mask: [B, S] bool (False = padding, never attended to).
  F = 0 is self-attention; F = P lets a response attend to a shared prompt's P keys before its own.
  Returns [B, K, G, T, D]; equal to cached_attention(q, k, v, F + arange(T), key_mask) up to rounding.
  """
  return _causal_forward(q, k, v, key_mask, block, first_slot)[0]


def _causal_fwd(q, k, v, key_mask, block, first_slot):
  out, lse = _causal_forward(q, k, v, key_mask, block, first_slot)
  return out, (q, k, v, key_mask, out, lse)


def _causal_bwd(block, first_slot, residuals, d_out):
  q, k, v, key_mask, out, lse = residuals
  groups, t, d = q.shape[2], q.shape[3], q.shape[4]
  # delta_i = Σ_d dO_i · O_i = Σ_j P_ij dP_ij: the softmax backward's row term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]

  def one_block(carry, inputs):
    dk, dv = carry  # [B, K, S, D] float32 each
    index, q_block, d_out_block, lse_block, delta_block = inputs
    scores, allowed = _block_scores(q_block, k, key_mask, first_slot + index * block, groups)
    probs = jnp.exp(scores - lse_block[..., None])  # [B, K, G·Q, S] float32
    dv = dv + jnp.einsum("bkqs,bkqd->bksd", probs.astype(q.dtype), d_out_block, preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("bkqd,bksd->bkqs", d_out_block, v, preferred_element_type=jnp.float32)
    d_scores = jnp.where(allowed, probs * (d_probs - delta_block[..., None]), 0.0) * (d ** -0.5)
    d_scores = d_scores.astype(q.dtype)
    dq_block = jnp.einsum("bkqs,bksd->bkqd", d_scores, k, preferred_element_type=jnp.float32)
    dk = dk + jnp.einsum("bkqs,bkqd->bksd", d_scores, q_block, preferred_element_type=jnp.float32)
    return (dk, dv), dq_block

  per_query = lambda x: _to_blocks(x[..., None], block)[..., 0]  # [B, K, G, T] -> [T/Q, B, K, G·Q]
  q_blocks = _to_blocks(q, block)
  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(one_block, (zeros, zeros),
                              (jnp.arange(q_blocks.shape[0]), q_blocks, _to_blocks(d_out, block),
                               per_query(lse), per_query(delta)))
  return (_from_blocks(dq, groups, t).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)


causal_attention.defvjp(_causal_fwd, _causal_bwd)
