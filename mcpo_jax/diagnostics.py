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


@functools.lru_cache(maxsize=None)
def gradient_cosines_program(graphdef, config: UpdateConfig, num_domains: int, minibatches: int = 1):
  """jit(params, batch, transfer, frozen) -> [D, D] cosines between the per-domain policy gradients of the
  trained LLM parameters (a LoRA model's adapters; frozen: its base weights, train.merge_policy).

  The batch is a whole RL step's, `minibatches` × the update's rows: it is run in `minibatches` × the update's
  micro-batches, so each forward holds no more rows than one of the update's.

  The D gradients stay sharded like the parameters and their Gram matrix is summed leaf by leaf: a flat
  [D, params] vector would be one unsharded array (~96 GB for an 8B model and three domains).
  """
  policy_only = dataclasses.replace(config, objective=dataclasses.replace(config.objective, algorithm="grpo"),
                                    micro_batches=config.micro_batches * minibatches)

  def cosines(params, batch, transfer, frozen=None):
    def gradient(domain):
      rows = batch.domain_ids == domain
      masked = batch.replace(mask=jnp.where(rows[:, None], batch.mask, 0))
      return loss_and_grads(graphdef, params, masked, transfer, policy_only, frozen)[2]["lm"]

    grads = jax.lax.map(gradient, jnp.arange(num_domains))  # leaves [D, *parameter shape]
    gram = sum(jnp.tensordot(g, g, axes=(tuple(range(1, g.ndim)),) * 2) for g in jax.tree.leaves(grads))  # [D, D]
    norms = jnp.sqrt(jnp.diagonal(gram))
    return gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-30)
  return jax.jit(cosines)


def domain_gradient_cosines(graphdef, params, batch, transfer, config: UpdateConfig, num_domains: int,
                            frozen=None, minibatches: int = 1) -> np.ndarray:
  """Host [D, D] matrix (0 where a domain has no rows or a zero gradient)."""
  program = gradient_cosines_program(graphdef, config, num_domains, minibatches)
  return to_host(program(params, batch, transfer, frozen))
