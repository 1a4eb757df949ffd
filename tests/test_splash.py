"""model/splash.py: the splash kernel equals the blockwise XLA core, the model picks it only on TPU, and it compiles for TPU.

Numerics run the kernel in Pallas's interpreter on CPU (float32, matmul precision "highest" from conftest):
real queries' outputs and all gradients agree with causal_attention within 2e-5 absolute (the model's parameter
gradients, entries up to ~50, within 2e-5 of each tensor's largest entry). Padding queries'
outputs are not compared: they are never read (model/splash.py says what they are). With libtpu installed a
2-layer model's update and rollout compile for v5e, v6e and v5p with the kernel in them; without it those
tests skip with the reason.
"""

import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_pod_run
from flax import nnx

from mcpo_jax import aot
from mcpo_jax import config as config_lib
from mcpo_jax.mesh import make_mesh
from mcpo_jax.model import init_model
from mcpo_jax.model.attention import causal_attention
from mcpo_jax.model.config import ModelConfig
from mcpo_jax.model.splash import segment_ids, splash_attention
from jax.experimental.pallas.ops.tpu.splash_attention import CausalMask
from configs.multi_domain import get_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install -r requirements-tpu.txt")
ATOL = 2e-5
CONFIG = ModelConfig("qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, attention_bias=True, tie_word_embeddings=True)


def _key_mask(batch: int, first_slot: int, length: int) -> np.ndarray:
  """[B, F + T] bool: left padding of the prompt part (or of the whole row when F = 0) and of the own part."""
  mask = np.ones((batch, first_slot + length), bool)
  mask[0, :5] = False  # left padding
  mask[1, first_slot:first_slot + 7] = False  # padding at the start of the own tokens (a left-padded response)
  mask[-1, :2] = False
  return mask


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_segment_ids_and_causal_offset_give_exactly_the_allowed_keys():
  """The kernel's mask (CausalMask offset F, and equal segments) against a NumPy reference: a real query sees the
  real keys at or before its slot; a padding query still sees one key (no empty softmax row)."""
  f, t = 24, 40
  key_mask = _key_mask(3, f, t)
  ids = segment_ids(jnp.asarray(key_mask), f, 128, 128)
  causal = CausalMask((128, 128), offset=f)[:, :]  # [q_len, kv_len]
  kernel = causal[None] & (np.asarray(ids.q)[:, :, None] == np.asarray(ids.kv)[:, None, :])  # [B, q_len, kv_len]
  slots = f + np.arange(t)
  reference = (np.arange(f + t)[None, :] <= slots[:, None])[None] & key_mask[:, None, :]  # [B, T, S]
  real = key_mask[:, f:]  # [B, T]
  np.testing.assert_array_equal(kernel[:, :t, :f + t][real], reference[real])
  assert not kernel[:, :t, f + t:].any()  # the added keys are after every query's slot
  assert kernel[:, :t].any(axis=-1).all()


@pytest.mark.parametrize("first_slot, length", [(0, 40), (24, 40), (100, 300)])
def test_splash_equals_the_blockwise_core_values_and_gradients(first_slot, length):
  b, kv_heads, groups, d = 3, 2, 2, 16
  s = first_slot + length
  q = _random((b, kv_heads, groups, length, d), 0)
  k, v = _random((b, kv_heads, s, d), 1), _random((b, kv_heads, s, d), 2)
  key_mask = jnp.asarray(_key_mask(b, first_slot, length))
  real = key_mask[:, None, None, first_slot:, None]  # [B, 1, 1, T, 1]
  weights = _random(q.shape, 3) * real  # a loss that reads real queries only, as the model's does

  xla = lambda q, k, v: causal_attention(q, k, v, key_mask, 16, first_slot)
  kernel = lambda q, k, v: splash_attention(q, k, v, key_mask, first_slot, interpret=True)
  np.testing.assert_allclose(*(np.asarray(jnp.where(real, f(q, k, v), 0)) for f in (xla, kernel)), atol=ATOL)
  grads = [jax.grad(lambda *x: jnp.sum(f(*x) * weights), argnums=(0, 1, 2))(q, k, v) for f in (xla, kernel)]
  for name, expected, got in zip("qkv", *grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=ATOL, err_msg=f"d{name}")


def _forward_and_prefill(model, ids, mask, prompt_len):
  """Logits of a full pass, of a shared-prefix pass, of the sampler's prefill, and the keys it returns."""
  full = model(ids, mask).logits
  prompt = model(ids[:2, :prompt_len], mask[:2, :prompt_len], return_logits=False, return_kv=True).cache
  prefix = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0) if x.ndim else x, prompt)
  after_prefix = model(ids[:, prompt_len:], mask[:, prompt_len:], prefix=prefix).logits
  prefill = model(ids[:, :prompt_len], mask[:, :prompt_len], return_kv=True)
  return full, after_prefix, prefill.logits, prefill.cache


def test_the_model_on_the_splash_path_equals_the_xla_path_on_the_cpu_mesh():
  """attention="splash" (interpreted, under the (1, 4, 2) mesh: rows over fsdp, KV heads over tensor) against
  "xla": full pass, shared-prefix pass, the sampler's prefill (its logits and the keys it returns), and gradients."""
  mesh = make_mesh(1, 4, 2, devices=jax.devices()[:8])
  models = {name: init_model(CONFIG, mesh=mesh, seed=1, attention=name) for name in ("xla", "splash")}
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (4, 12)))
  mask = np.ones((4, 12), np.int32)
  mask[1, :3] = 0
  mask[2, 6:8] = 0  # a left-padded response after the prompt (prompt_len 6)
  mask = jnp.asarray(mask)
  outputs = {name: jax.jit(_forward_and_prefill, static_argnums=3)(model, ids, mask, 6)
             for name, model in models.items()}
  (full, after_prefix, prefill, cache), (full_s, after_prefix_s, prefill_s, cache_s) = outputs.values()
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(full_s)[real], np.asarray(full)[real], atol=ATOL)
  np.testing.assert_allclose(np.asarray(after_prefix_s)[real[:, 6:]], np.asarray(after_prefix)[real[:, 6:]],
                             atol=ATOL)
  np.testing.assert_allclose(np.asarray(prefill_s)[real[:, :6]], np.asarray(prefill)[real[:, :6]], atol=ATOL)
  np.testing.assert_array_equal(np.asarray(cache_s.key_mask), np.asarray(cache.key_mask))
  assert int(cache_s.index) == int(cache.index) == 6
  slots = np.asarray(cache.key_mask)  # [B, S]: the real slots hold the same keys
  for got, expected in zip(jax.tree.leaves(cache_s.layers), jax.tree.leaves(cache.layers)):
    np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1, 3)[slots],
                               np.asarray(expected).transpose(0, 2, 1, 3)[slots], atol=ATOL)

  def loss(model):
    return jnp.sum(model(ids, mask).logits * real[..., None] * jnp.arange(CONFIG.vocab_size) / CONFIG.vocab_size)
  grads = [jax.jit(nnx.grad(loss))(model) for model in models.values()]
  for (path, expected), (_, got) in zip(nnx.to_flat_state(grads[0]), nnx.to_flat_state(grads[1])):
    expected, got = np.asarray(expected[...]), np.asarray(got[...])  # entries up to ~50: compared relative to the largest
    np.testing.assert_allclose(got, expected, atol=ATOL * np.abs(expected).max(), err_msg=str(path))


def _lowered_training_forward(model):
  ids = jnp.zeros((8, 12), jnp.int32)
  return jax.jit(lambda model, ids: model(ids, jnp.ones_like(ids)).logits).lower(model, ids).as_text()


def test_auto_is_the_unchanged_xla_path_on_cpu():
  mesh = make_mesh(1, -1, 1)
  auto, xla = (_lowered_training_forward(init_model(CONFIG, mesh=mesh, attention=a)) for a in ("auto", "xla"))
  assert auto == xla and "tpu_custom_call" not in auto
  with pytest.raises(ValueError, match="attention='flash'"):
    init_model(CONFIG, attention="flash")
  config = get_config("tiny")
  config.model.attention = "flash"
  with pytest.raises(config_lib.ConfigError, match=r"--config.model.attention='flash' is not allowed"):
    config_lib.build(config)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  return tiny_pod_run(tmp_path_factory, "tiny_qwen2_splash")


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2", "v5p:2x2x1"])
def test_update_and_rollout_compile_for_tpu_with_the_splash_kernel(tiny_run, topology):
  """The real programs (the update's forward + backward over a shared prefix; the rollout's prefill) on "auto"."""
  mesh = make_mesh(1, -1, 1, devices=aot.topology_devices(topology))
  programs = {p.name: p for p in aot.programs(tiny_run, aot.model_config(tiny_run.model.name), mesh)}
  # conftest's global "highest" matmul precision would ask Mosaic for an fp32 contraction of the kernel's bf16
  # operands, which it rejects; runs keep JAX's default.
  with jax.default_matmul_precision("default"):
    compiled = {name: programs[name].lower().compile().as_text() for name in ("update (one minibatch)", "rollout")}
  assert all("tpu_custom_call" in text for text in compiled.values())
  for kernel in ("splash_mha_fwd_segmented", "splash_mha_dq_segmented", "splash_mha_dkv_segmented"):
    assert kernel in compiled["update (one minibatch)"], kernel  # the forward and both backward kernels
  assert "splash_mha_fwd_segmented" in compiled["rollout"]  # the prefill


@needs_libtpu
def test_xla_setting_keeps_tpu_on_the_xla_core():
  mesh = make_mesh(1, -1, 1, devices=aot.topology_devices("v5e:2x2"))
  settings = lambda attention: types.SimpleNamespace(model=types.SimpleNamespace(
      dtype="bfloat16", param_dtype="float32", remat="none", attention=attention))
  lowered = {}
  for attention in ("auto", "xla"):
    graphdef, params = aot.abstract_model(CONFIG, mesh, settings(attention))
    ids = aot.abstract((8, 12), jnp.int32, mesh, ("batch", None))
    forward = lambda params, ids: nnx.merge(graphdef, params)(ids, jnp.ones_like(ids)).logits
    lowered[attention] = jax.jit(forward).lower(params, ids).as_text()
  assert "tpu_custom_call" in lowered["auto"] and "tpu_custom_call" not in lowered["xla"]
