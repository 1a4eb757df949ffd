"""Interference diagnostics: how aligned are the policy gradients of the different domains?

For each domain d the GRPO policy gradient is taken on that domain's rows alone; the D×D matrix of
their cosines shows whether domains pull the shared weights the same way (> 0) or fight (< 0).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mcpo_jax.mesh import to_host
from mcpo_jax.train import UpdateConfig, loss_and_grads


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _domain_gradients(graphdef, params, batch, transfer, config: UpdateConfig, num_domains: int, frozen) -> jax.Array:
  """[D, D] cosines between per-domain policy gradients over all trained LLM parameters."""
  policy_only = dataclasses.replace(config, objective=dataclasses.replace(config.objective, algorithm="grpo"))

  def flat_gradient(domain):
    rows = batch.domain_ids == domain
    masked = batch.replace(mask=jnp.where(rows[:, None], batch.mask, 0))
    _, _, grads = loss_and_grads(graphdef, params, masked, transfer, policy_only, frozen)
    return jnp.concatenate([g.reshape(-1) for g in jax.tree.leaves(grads["lm"])])

  gradients = jax.lax.map(flat_gradient, jnp.arange(num_domains))  # [D, params]
  norms = jnp.linalg.norm(gradients, axis=1)
  return (gradients @ gradients.T) / jnp.maximum(norms[:, None] * norms[None, :], 1e-30)


def domain_gradient_cosines(graphdef, params, batch, transfer, config: UpdateConfig, num_domains: int,
                            frozen=None) -> np.ndarray:
  """Host [D, D] matrix (0 where a domain has no rows or a zero gradient) over the trained LLM parameters
  (a LoRA model's adapters); frozen: a LoRA model's base weights (train.merge_policy)."""
  return to_host(_domain_gradients(graphdef, params, batch, transfer, config, num_domains, frozen))
