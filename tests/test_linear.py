"""The model's matmul with its hand-written backward, against float64 NumPy: y = x·W, dx = dy·Wᵀ, dW = xᵀ·dy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcpo_jax.model.linear import linear


def _reference(x, w, dy):
  x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
  rows_x, rows_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  return x @ w, dy @ w.T, rows_x.T @ rows_dy


@pytest.mark.parametrize("shape", [(7, 5), (3, 11, 5), (2, 3, 4, 5)])
def test_values_and_gradients_match_numpy(shape):
  rng = np.random.default_rng(len(shape))
  x = rng.standard_normal(shape).astype(np.float32)
  w = rng.standard_normal((shape[-1], 13)).astype(np.float32)
  dy = rng.standard_normal(shape[:-1] + (13,)).astype(np.float32)
  y, vjp = jax.vjp(linear, jnp.asarray(x), jnp.asarray(w))
  dx, dw = vjp(jnp.asarray(dy))
  y_ref, dx_ref, dw_ref = _reference(x, w, dy)
  for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)  # float32 sums of ≤ 66 terms
  assert dx.dtype == jnp.float32 and dw.shape == w.shape


def test_low_precision_inputs_with_a_float32_output():
  """bfloat16 operands, float32 logits (the LM head): gradients come back in the operands' dtypes."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 6, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((32, 9)), jnp.bfloat16)
  dy = rng.standard_normal((4, 6, 9)).astype(np.float32)
  y, vjp = jax.vjp(lambda x, w: linear(x, w, jnp.float32), x, w)
  dx, dw = vjp(jnp.asarray(dy))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
  y_ref, dx_ref, dw_ref = _reference(np.asarray(x, np.float32), np.asarray(w, np.float32),
                                     np.asarray(jnp.asarray(dy, jnp.bfloat16), np.float32))
  np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-4)  # exact products, float32 sums
  for got, want in ((dx, dx_ref), (dw, dw_ref)):  # one bfloat16 rounding of the result: 2⁻⁸ relative
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-1)


def test_jit_and_remat_keep_the_gradient():
  """Under jit and jax.checkpoint (the model's remat), the gradient is unchanged."""
  rng = np.random.default_rng(1)
  x, w, w2 = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((5, 8), (8, 6), (6, 3)))
  loss = lambda x, w, w2: jnp.sum(jnp.tanh(linear(x, w)) @ w2)
  plain = jax.grad(loss, argnums=(0, 1))(x, w, w2)
  for policy in (jax.checkpoint_policies.nothing_saveable, jax.checkpoint_policies.dots_with_no_batch_dims_saveable):
    remat = jax.jit(jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1)))(x, w, w2)
    for a, b in zip(plain, remat):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  h = np.tanh(np.asarray(x, np.float64) @ np.asarray(w, np.float64))
  d_pre = (1 - h * h) * np.asarray(w2, np.float64).sum(axis=1)  # d loss / d (x·w)
  np.testing.assert_allclose(np.asarray(plain[1]), np.asarray(x, np.float64).T @ d_pre, rtol=1e-5, atol=1e-5)
