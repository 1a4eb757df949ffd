"""x · W for the model's weights, with a backward pass that keeps activation gradients row-major.

Autodiff of y = x·W asks for the weight gradient as dW = xᵀ·dy. XLA:CPU's layout assignment then
lays dy out transposed for that matmul, so the elementwise fusion producing dy (the SwiGLU backward,
RoPE's backward) writes [rows, N] activations with strided stores: 7.8 s of a 46 s update on
SmolLM2-135M shapes. Asking for dWᵀ = dyᵀ·x instead and transposing that weight-sized result leaves
every activation-sized array in row-major order (an MLP's forward + backward: 179 → 132 ms on this
CPU). Same products, same FLOPs, bit-identical results; the one extra transpose is weight-sized.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

_CONTRACT_ROWS = (((0,), (0,)), ((), ()))  # dot_general dims: contract the leading (row) axis of both


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def linear(x: jax.Array, w: jax.Array, out_dtype: Any = None) -> jax.Array:
  """x [..., K] · w [K, N] -> [..., N] in out_dtype (default x's dtype), accumulated in float32."""
  return _forward(x, w, out_dtype)


def _forward(x, w, out_dtype):
  y = jnp.matmul(x, w, preferred_element_type=jnp.float32)
  return y.astype(out_dtype or x.dtype)


def _linear_fwd(x, w, out_dtype):
  return _forward(x, w, out_dtype), (x, w)


def _linear_bwd(out_dtype, residuals, dy):
  x, w = residuals
  dy = dy.astype(x.dtype)  # [..., N], in the compute dtype as autodiff would cast it
  dx = jnp.matmul(dy, w.T, preferred_element_type=jnp.float32).astype(x.dtype)  # [..., K]
  rows_dy, rows_x = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # [R, N], [R, K]
  dw_t = jax.lax.dot_general(rows_dy, rows_x, _CONTRACT_ROWS, preferred_element_type=jnp.float32)  # [N, K]
  return dx, dw_t.T.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)
