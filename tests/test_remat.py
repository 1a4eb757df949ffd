"""Layer rematerialisation changes memory, never results: the sampler and the update under every
`model.remat` policy equal remat "none" on the 8-device mesh (tolerance 1e-5, float32)."""

import jax
import numpy as np
import pytest
from test_train import CONFIG, G, TRANSFER, _batch, _max_diff

from mcpo_jax.mesh import make_mesh
from mcpo_jax.model import init_model
from mcpo_jax.model.transformer import REMAT_POLICIES
from mcpo_jax.objectives import ObjectiveConfig
from mcpo_jax.sampling import generate
from mcpo_jax.train import OptimConfig, UpdateConfig, init_train_state, loss_and_grads, make_optimizer, shard_batch

MESH_SHAPE = (1, 2, 4)  # data, fsdp, tensor: all 8 devices


def _model(remat):
  return init_model(CONFIG, mesh=make_mesh(*MESH_SHAPE), seed=1, remat=remat)


def _rollouts(remat):
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, CONFIG.vocab_size, (4, 6))
  mask = np.ones_like(prompts)
  mask[1, :2] = 0  # one left-padded prompt
  out = generate(_model(remat), prompts, mask, group_size=2, max_new_tokens=5, temperature=1.0,
                 key=jax.random.key(3))
  return np.asarray(out.tokens), np.asarray(out.logprobs)


def _grads(remat, micro_batches):
  model = _model(remat)
  mesh = model.mesh
  graphdef, state = init_train_state(model, make_optimizer(OptimConfig()), proj_dim=32)
  objective = ObjectiveConfig(group_size=G, lambda_cross=1.0, lambda_in=1.0)
  config = UpdateConfig(objective=objective, logit_chunk=5, micro_batches=micro_batches)
  fn = jax.jit(lambda params, batch: loss_and_grads(graphdef, params, batch, TRANSFER, config))
  loss, _, grads = fn(state.params, shard_batch(_batch(), mesh))
  return float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("remat", sorted(set(REMAT_POLICIES) - {"none"}))
def test_sampler_under_remat_equals_no_remat(remat):
  tokens, logp = _rollouts(remat)
  tokens_none, logp_none = _rollouts("none")
  np.testing.assert_array_equal(tokens, tokens_none)
  np.testing.assert_allclose(logp, logp_none, atol=1e-5)


@pytest.mark.parametrize("micro_batches", [1, 2, 4])
@pytest.mark.parametrize("remat", sorted(set(REMAT_POLICIES) - {"none"}))
def test_update_under_remat_equals_no_remat(remat, micro_batches):
  loss, grads = _grads(remat, micro_batches)
  loss_none, grads_none = _grads("none", micro_batches)
  assert abs(loss - loss_none) < 1e-5
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads_none))
  assert _max_diff(grads, grads_none) <= 1e-5 * max(scale, 1.0)


def test_lora_update_under_full_remat_equals_no_remat():
  """qwix's adapters are created outside jax.checkpoint and then run inside it (model/lora.py)."""
  from mcpo_jax.config import LoraSettings
  from mcpo_jax.model import apply_lora, frozen_params

  def lora_grads(remat):
    model, _ = apply_lora(init_model(CONFIG, seed=1, remat=remat), LoraSettings(rank=4), seed=0)
    frozen = frozen_params(model)
    graphdef, state = init_train_state(model, make_optimizer(OptimConfig()), proj_dim=8)
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(5), x.shape, x.dtype),
                          state.params)  # B ≠ 0: the adapters matter
    config = UpdateConfig(objective=ObjectiveConfig(group_size=G), logit_chunk=5, micro_batches=2)
    loss, _, grads = jax.jit(lambda p, b, f: loss_and_grads(graphdef, p, b, TRANSFER, config, f))(
        params, shard_batch(_batch(), None), frozen)
    return float(loss), jax.tree.map(np.asarray, grads)
  (loss, grads), (loss_none, grads_none) = lora_grads("full"), lora_grads("none")
  assert abs(loss - loss_none) < 1e-5
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads_none))
  assert _max_diff(grads, grads_none) <= 1e-5 * max(scale, 1.0)
