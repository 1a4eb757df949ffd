"""The attention cores against PyTorch autograd of plain dense masked attention, and the blockwise
training path through the whole model against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import torch
from conftest import left_padded_batch

from mcpo_jax.model import from_pretrained, transformer
from mcpo_jax.model.attention import cached_attention, causal_attention

TOL = 1e-5  # float32, max abs; outputs and gradients are O(1)


def _inputs(seed, b=3, kv=2, g=3, t=37, d=16):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(shape).astype(np.float32)
             for shape in ((b, kv, g, t, d), (b, kv, t, d), (b, kv, t, d)))
  key_mask = np.ones((b, t), bool)
  key_mask[0, :5] = False  # left padding: the first 5 queries of row 0 see no key at all
  key_mask[1, -9:] = False  # right padding
  key_mask[2, ::4] = False  # holes
  # A query that sees no key (row 0, slots 0-4: left padding) has an arbitrary output in every
  # implementation; padding rows never reach a loss, so their output gradient is zero.
  sees_a_key = np.cumsum(key_mask, axis=1) > 0  # [B, T]
  d_out = rng.standard_normal((b, kv, g, t, d)).astype(np.float32) * sees_a_key[:, None, None, :, None]
  return q, k, v, key_mask, d_out, sees_a_key


def _torch_dense(q, k, v, key_mask, d_out, first_slot=0):
  """Softmax(q kᵀ / √d) v with causal and key masks, and its autograd gradients w.r.t. q, k, v.

  Query i sits at slot first_slot + i of the S keys."""
  q, k, v = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
  t, s = q.shape[3], k.shape[2]
  scores = torch.einsum("bkgtd,bksd->bkgts", q, k) / q.shape[-1] ** 0.5
  causal = torch.tril(torch.ones(t, s, dtype=torch.bool), diagonal=first_slot)
  allowed = causal[None] & torch.tensor(key_mask)[:, None, :]  # [B, T, S]
  scores = scores.masked_fill(~allowed[:, None, None], torch.finfo(torch.float32).min)
  out = torch.einsum("bkgts,bksd->bkgtd", torch.softmax(scores, dim=-1), v)
  out.backward(torch.tensor(d_out, dtype=torch.float64))
  return out.detach().numpy(), q.grad.numpy(), k.grad.numpy(), v.grad.numpy()


@pytest.mark.parametrize("block", [1, 8, 37, 128])
def test_blockwise_causal_attention_matches_torch_dense(block):
  q, k, v, key_mask, d_out, sees_a_key = _inputs(seed=block)
  want_out, want_dq, want_dk, want_dv = _torch_dense(q, k, v, key_mask, d_out)

  out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, jnp.asarray(key_mask), block), q, k, v)
  dq, dk, dv = vjp(jnp.asarray(d_out))
  real = sees_a_key[:, None, None, :, None]
  for got, want in ((out * real, want_out * real), (dq, want_dq), (dk, want_dk), (dv, want_dv)):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("block", [1, 8, 64])
def test_blockwise_attention_after_a_shared_prefix_matches_torch_dense(block):
  """Queries at slots F..F+T-1 over [F prefix keys; T own keys]: the shared-prompt training path."""
  first, t = 13, 21
  q, k, v, key_mask, d_out, _ = _inputs(seed=block + 100, t=first + t)
  q, d_out = q[:, :, :, first:], d_out[:, :, :, first:]  # the last T queries
  key_mask[1, :4] = False  # a left-padded prefix
  want_out, want_dq, want_dk, want_dv = _torch_dense(q, k, v, key_mask, d_out, first_slot=first)
  out, vjp = jax.vjp(lambda q, k, v: causal_attention(q, k, v, jnp.asarray(key_mask), block, first), q, k, v)
  for got, want in zip((out, *vjp(jnp.asarray(d_out))), (want_out, want_dq, want_dk, want_dv)):
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_cached_attention_over_a_cache_matches_torch_dense():
  q, k, v, key_mask, _, sees_a_key = _inputs(seed=7)
  want_out = _torch_dense(q, k, v, key_mask, np.zeros_like(q))[0]
  t = q.shape[3]
  # The same keys written at slots 4..4+T of a longer cache whose other slots hold junk.
  pad = lambda x: np.concatenate([np.full(x.shape[:2] + (4,) + x.shape[3:], 9.0, x.dtype), x,
                                  np.full(x.shape[:2] + (5,) + x.shape[3:], -9.0, x.dtype)], axis=2)
  cache_mask = np.concatenate([np.zeros((3, 4), bool), key_mask, np.ones((3, 5), bool)], axis=1)
  got = cached_attention(jnp.asarray(q), jnp.asarray(pad(k)), jnp.asarray(pad(v)), 4 + jnp.arange(t),
                         jnp.asarray(cache_mask))
  real = sees_a_key[:, None, None, :, None]
  np.testing.assert_allclose(np.asarray(got) * real, want_out * real, atol=TOL, rtol=0)


def test_whole_model_with_small_attention_blocks_matches_transformers(tiny_checkpoints, monkeypatch):
  """Many query blocks (a ragged last one) through every layer: logits and a gradient still match."""
  monkeypatch.setattr(transformer, "ATTENTION_BLOCK", 5)
  directory, hf_model = tiny_checkpoints["qwen3"]
  ids, mask = left_padded_batch(np.random.default_rng(1), 4, 23, hf_model.config.vocab_size)
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  weights = np.random.default_rng(2).standard_normal((4, 23, hf_model.config.vocab_size)).astype(np.float32)
  weights *= mask[..., None]
  hf_model.zero_grad()
  out = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
  torch.sum(out.logits * torch.tensor(weights)).backward()
  want_logits = out.logits.detach().numpy()
  want_grad = hf_model.model.layers[0].self_attn.q_proj.weight.grad.numpy()  # [H·D, E]

  graphdef, params = nnx.split(from_pretrained(directory))

  def loss(params):
    logits = nnx.merge(graphdef, params)(jnp.asarray(ids), jnp.asarray(mask)).logits
    return jnp.sum(logits * weights), logits

  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  grad = grads["layers"][0]["attn"]["q_proj"][...]  # [E, H, D]
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], want_logits[real], atol=1e-4, rtol=0)
  e, h, d = grad.shape
  np.testing.assert_allclose(np.asarray(grad).reshape(e, h * d).T, want_grad, atol=1e-3, rtol=1e-4)
