"""Splash attention (the Pallas TPU kernel in jax.experimental.pallas.ops.tpu) behind causal_attention's contract.

The TPU path of the training forward and of the prefill (the selection is in transformer.py). The
layout is mapped exactly onto the kernel's two masks:

- the static mask is CausalMask((T, S), offset=F): query i sits at slot F + i and sees keys j <= F + i,
  so the shared-prefix layout (keys [prompt (F); own (T)]) is the same mask with offset F;
- padding is segment ids: a real key is segment 1, a padding key segment 0, and a query takes its own
  slot's segment (key_mask[F + i]). A real query therefore sees exactly the real keys at or before its
  slot; a padding query sees padding keys (at least its own slot), so no row is empty. Padding rows'
  outputs differ from the XLA path's (there they average every key) and are never read: a padding
  position's output reaches only padding positions, and its loss weight is zero.

The kernel needs sequence lengths that its blocks divide and blocks that are multiples of 128, so T
and S are zero-padded to multiples of 128 (the added queries and keys are segment 0 and the added keys
come after every real query's slot) and the output is sliced back. The kernel does not scale the
scores: q is multiplied by D^-0.5 first. Query head k·G + g reads KV head k, which is the kernel's
grouped-query rule (head h reads KV head h // G), so GQA needs no copy of the keys. Under a mesh the
kernel runs per shard (shard_map; XLA cannot partition a Mosaic kernel): rows over the batch axes, heads
over the tensor axis. The kernel's dots take the matmul precision set when the program is lowered:
under a global "highest" Mosaic rejects bf16 operands (the tests lower TPU programs under "default").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec

from mcpo_jax.mesh import logical_to_spec

LANES = 128  # the kernel's block sizes are multiples of this
BLOCK_CHOICES = (512, 256, 128)  # the largest that divides a (padded) length is its block


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block(length: int) -> int:
  return next(b for b in BLOCK_CHOICES if length % b == 0)


def make_kernel(heads: int, q_len: int, kv_len: int, first_slot: int, interpret: bool):
  """The splash kernel for `heads` query heads of q_len queries (at slots first_slot + i) over kv_len keys.

  q_len and kv_len must be multiples of 128. Called on one row: q [heads, q_len, D], k/v [K, kv_len, D].
  """
  mask = splash.MultiHeadMask([splash.CausalMask((q_len, kv_len), offset=first_slot)] * heads)
  bq, bkv = _block(q_len), _block(kv_len)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                            block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def segment_ids(key_mask: jax.Array, first_slot: int, q_len: int, kv_len: int) -> splash.SegmentIds:
  """key_mask [B, S] bool -> SegmentIds(q [B, q_len], kv [B, kv_len]) int32: 1 real, 0 padding (and the added tail)."""
  s = key_mask.shape[1]
  kv = jnp.pad(key_mask.astype(jnp.int32), ((0, 0), (0, kv_len - s)))
  q = jnp.pad(key_mask[:, first_slot:].astype(jnp.int32), ((0, 0), (0, q_len - (s - first_slot))))
  return splash.SegmentIds(q=q, kv=kv)


def _splash_local(q, k, v, key_mask, first_slot: int, interpret: bool):
  """splash_attention on one device's shard: q [B, K, G, T, D]; k, v [B, K, S, D]; key_mask [B, S]."""
  b, kv_heads, groups, t, d = q.shape
  q_len, kv_len = _round_up(t, LANES), _round_up(k.shape[2], LANES)
  q = (q * d ** -0.5).astype(q.dtype).reshape(b, kv_heads * groups, t, d)  # [B, H, T, D], head k·G + g
  q = jnp.pad(q, ((0, 0), (0, 0), (0, q_len - t), (0, 0)))
  pad_keys = ((0, 0), (0, 0), (0, kv_len - k.shape[2]), (0, 0))
  k, v = jnp.pad(k, pad_keys), jnp.pad(v, pad_keys)
  kernel = make_kernel(kv_heads * groups, q_len, kv_len, first_slot, interpret)
  out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(
      q, k, v, segment_ids(key_mask, first_slot, q_len, kv_len))  # [B, H, q_len, D]
  return out[:, :, :t].reshape(b, kv_heads, groups, t, d)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, first_slot: int = 0, *,
                     mesh: Mesh | None = None, interpret: bool = False) -> jax.Array:
  """causal_attention(q, k, v, key_mask, block, first_slot) with the splash kernel (its own blocks, so no `block`).

  q: [B, K, G, T, D]; k, v: [B, K, S = F + T, D]; key_mask: [B, S] bool. Returns [B, K, G, T, D]; the
  real queries' rows equal causal_attention's up to rounding. interpret: run the kernel in Pallas's
  interpreter (any backend; tests). With a mesh the kernel runs per shard: rows split like "batch", KV
  heads like "kv_heads", or the G query heads of each like "heads" when the KV heads do not divide.
  """
  local = functools.partial(_splash_local, first_slot=first_slot, interpret=interpret)
  if mesh is None:
    return local(q, k, v, key_mask)
  q_spec = logical_to_spec(("batch", "kv_heads", "heads", "length", "head_dim"), q.shape, mesh)
  kv_spec = PartitionSpec(q_spec[0], q_spec[1], None, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)),
                       out_specs=q_spec, check_vma=False)(q, k, v, key_mask)
