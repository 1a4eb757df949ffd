"""The interference diagnostics: per-domain gradient cosines against NumPy on the flattened gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import CONFIG, G, TRANSFER, _batch

from mcpo_jax.diagnostics import domain_gradient_cosines
from mcpo_jax.mesh import make_mesh
from mcpo_jax.model import init_model
from mcpo_jax.objectives import ObjectiveConfig
from mcpo_jax.train import OptimConfig, UpdateConfig, init_train_state, loss_and_grads, make_optimizer, shard_batch


@pytest.mark.parametrize("minibatches", [1, 2])  # 2: the batch in twice the update's micro-batches
def test_gradient_cosines_equal_numpy_on_flat_per_domain_gradients(minibatches):
  mesh = make_mesh(1, 2, 4)  # all 8 devices: the gradients are sharded, the Gram matrix summed per leaf
  graphdef, state = init_train_state(init_model(CONFIG, mesh=mesh, seed=2), make_optimizer(OptimConfig()), proj_dim=8)
  config = UpdateConfig(objective=ObjectiveConfig(group_size=G), logit_chunk=5)
  batch = shard_batch(_batch(seed=3), mesh)
  cosines = domain_gradient_cosines(graphdef, state.params, batch, TRANSFER, config, 3, minibatches=minibatches)

  grpo = dataclasses.replace(config, objective=dataclasses.replace(config.objective, algorithm="grpo"))
  flat = []
  for domain in range(3):  # the reference: each domain's rows alone, a flat float64 gradient
    rows = np.asarray(batch.domain_ids) == domain
    masked = batch.replace(mask=jnp.where(jnp.asarray(rows)[:, None], batch.mask, 0))
    grads = loss_and_grads(graphdef, state.params, masked, TRANSFER, grpo)[2]["lm"]
    flat.append(np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(grads)]))
  flat = np.stack(flat)
  norms = np.linalg.norm(flat, axis=1)
  want = flat @ flat.T / np.outer(norms, norms)
  np.testing.assert_allclose(cosines, want, atol=1e-5)  # float32 sums over ~10⁵ entries
  assert np.abs(want - np.eye(3)).max() > 1e-3  # the domains' gradients do differ: the check can fail
