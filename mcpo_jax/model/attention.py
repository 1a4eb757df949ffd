"""Attention cores: dense over a KV cache (sampling), blockwise causal with a recomputing VJP (training).

Both take queries grouped by KV head, so each product is a plain batched matmul over (B, K) with no
copy of the keys: q [B, K, G, T, D] (G = H / K query heads per KV head), k, v [B, K, S, D].

The training path (no cache, queries at slots 0..T-1) never keeps a [T, S] matrix: the forward goes
over query blocks, each against only the causal prefix of keys it can see, and keeps just the output
and the per-query log-sum-exp; the backward recomputes each block's probabilities from them (the
flash-attention recipe, here in plain XLA). Activation memory is therefore linear in T, and the
score FLOPs fall by up to half. jax.checkpoint around a dense core does not achieve this: XLA:CPU
schedules the recomputed [T, S] blocks of all layers together.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = jnp.finfo(jnp.float32).min  # a finite fill, so a row with no visible key stays finite


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, query_slots: jax.Array,
                     key_mask: jax.Array) -> jax.Array:
  """Dense attention of T queries over S cache slots.

  q: [B, K, G, T, D]; k, v: [B, K, S, D]; query_slots: [T] int (slot of each query); key_mask: [B, S]
  bool. A query sees the real slots at or before its own. Returns [B, K, G, T, D].
  """
  b, kv, g, t, d = q.shape
  scores = jnp.einsum("bkqd,bksd->bkqs", q.reshape(b, kv, g * t, d), k,
                      preferred_element_type=jnp.float32) * (d ** -0.5)  # [B, K, G·T, S]
  allowed = (jnp.arange(k.shape[2])[None, :] <= query_slots[:, None])[None] & key_mask[:, None, :]  # [B, T, S]
  allowed = jnp.tile(allowed, (1, g, 1))[:, None]  # [B, 1, G·T, S]
  probs = jax.nn.softmax(jnp.where(allowed, scores, _MASKED), axis=-1).astype(q.dtype)
  return jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kv, g, t, d)


def _blocks(length: int, block: int) -> list[tuple[int, int]]:
  return [(start, min(start + block, length)) for start in range(0, length, block)]


def _block_scores(q, k, key_mask, start, stop):
  """Masked scores of queries [start, stop) against their causal prefix of keys [0, stop).

  q: [B, K, G, T, D]; k: [B, K, T, D]; key_mask: [B, T]. Returns the block's queries
  [B, K, G·Q, D], its scores [B, K, G·Q, stop] float32 and the mask of visible keys.
  """
  b, kv, g, _, d = q.shape
  q_block = q[:, :, :, start:stop].reshape(b, kv, g * (stop - start), d)
  scores = jnp.einsum("bkqd,bksd->bkqs", q_block, k[:, :, :stop],
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  causal = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]  # [Q, stop]
  allowed = causal[None] & key_mask[:, None, :stop]  # [B, Q, stop]
  allowed = jnp.tile(allowed, (1, g, 1))[:, None]  # [B, 1, G·Q, stop]
  return q_block, jnp.where(allowed, scores, _MASKED), allowed


def _causal_forward(q, k, v, key_mask, block):
  b, kv, g, t, d = q.shape
  outs, lses = [], []
  for start, stop in _blocks(t, block):
    _, scores, _ = _block_scores(q, k, key_mask, start, stop)
    lse = jax.nn.logsumexp(scores, axis=-1, keepdims=True)  # [B, K, G·Q, 1]
    probs = jnp.exp(scores - lse).astype(q.dtype)
    outs.append(jnp.einsum("bkqs,bksd->bkqd", probs, v[:, :, :stop]).reshape(b, kv, g, stop - start, d))
    lses.append(lse.reshape(b, kv, g, stop - start))
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)  # [B, K, G, T, D], [B, K, G, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, block: int) -> jax.Array:
  """Causal self-attention of T tokens at slots 0..T-1, in query blocks of `block`.

  q: [B, K, G, T, D]; k, v: [B, K, T, D]; key_mask: [B, T] bool (False = padding, never attended to).
  Returns [B, K, G, T, D]; equal to cached_attention(q, k, v, arange(T), key_mask) up to rounding.
  """
  return _causal_forward(q, k, v, key_mask, block)[0]


def _causal_fwd(q, k, v, key_mask, block):
  out, lse = _causal_forward(q, k, v, key_mask, block)
  return out, (q, k, v, key_mask, out, lse)


def _causal_bwd(block, residuals, d_out):
  q, k, v, key_mask, out, lse = residuals
  b, kv, g, t, d = q.shape
  # delta_i = Σ_d dO_i · O_i = Σ_j P_ij dP_ij: the softmax backward's row term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]
  dq_blocks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for start, stop in _blocks(t, block):
    rows = g * (stop - start)
    q_block, scores, allowed = _block_scores(q, k, key_mask, start, stop)
    probs = jnp.exp(scores - lse[:, :, :, start:stop].reshape(b, kv, rows, 1))  # [B, K, G·Q, stop] float32
    d_out_block = d_out[:, :, :, start:stop].reshape(b, kv, rows, d)
    dv = dv.at[:, :, :stop].add(jnp.einsum("bkqs,bkqd->bksd", probs.astype(q.dtype), d_out_block,
                                           preferred_element_type=jnp.float32))
    d_probs = jnp.einsum("bkqd,bksd->bkqs", d_out_block, v[:, :, :stop], preferred_element_type=jnp.float32)
    d_scores = probs * (d_probs - delta[:, :, :, start:stop].reshape(b, kv, rows, 1))
    d_scores = (jnp.where(allowed, d_scores, 0.0) * (d ** -0.5)).astype(q.dtype)
    dq_blocks.append(jnp.einsum("bkqs,bksd->bkqd", d_scores, k[:, :, :stop],
                                preferred_element_type=jnp.float32).reshape(b, kv, g, stop - start, d))
    dk = dk.at[:, :, :stop].add(jnp.einsum("bkqs,bkqd->bksd", d_scores, q_block,
                                           preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dq_blocks, axis=3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


causal_attention.defvjp(_causal_fwd, _causal_bwd)
