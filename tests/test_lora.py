"""LoRA policies (qwix): zero-B adapters leave the logits unchanged, the merged and the adapters-only exports
reproduce the LoRA model in transformers, only the adapters and the head train, and they learn."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import left_padded_batch
from test_learning import CONFIG, train_on_the_task  # the learnable task, with adapters here
from flax import nnx

from mcpo_jax import config as run_config
from mcpo_jax.mesh import make_mesh
from mcpo_jax.model import LoraSettings, apply_lora, frozen_params, from_pretrained, init_model, save_pretrained
from mcpo_jax.train import OptimConfig, init_train_state, make_optimizer

FAMILIES = ("llama", "qwen2", "qwen3")
PARITY_TOL = 1e-4  # float32 against transformers, max abs over real positions (as tests/test_model.py)
SAME_OP_TOL = 1e-5  # float32: a target's einsum and the base model's reshaped matmul round differently (seen: 1.4e-6)


def _mesh():
  return make_mesh(1, 2, 4)


def _logits(model, ids, mask):
  """LoRA models run under jit (qwix finds each adapted weight by tracing it back to its Param)."""
  return np.asarray(jax.jit(lambda m, i, a: m(i, a).logits)(model, ids, mask))


def _torch_logits(hf_model, ids, mask):
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
  with torch.no_grad():
    return hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()


def _randomise_b(model, seed: int):
  """Every adapter's B (zeros from qwix) set to N(0, 0.05²), so the adapters change the logits."""
  flat = []
  for i, (path, variable) in enumerate(sorted(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))):
    if path[-1].endswith("_lora_b"):
      noise = 0.05 * jax.random.normal(jax.random.key(seed + i), variable.shape, variable.dtype)
      variable = variable.replace(jax.device_put(noise, variable[...].sharding))
    flat.append((path, variable))
  nnx.update(model, nnx.from_flat_state(flat))


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_adapters_leave_the_logits_unchanged(tiny_checkpoints, family):
  directory, hf_model = tiny_checkpoints[family]
  ids, mask = left_padded_batch(np.random.default_rng(0), 8, 16, hf_model.config.vocab_size)
  base = from_pretrained(directory, mesh=_mesh())
  lora, reference_graphdef = apply_lora(base, LoraSettings(rank=4), seed=1)
  real = mask.astype(bool)
  got = _logits(lora, ids, mask)
  np.testing.assert_allclose(got[real], _logits(base, ids, mask)[real], atol=SAME_OP_TOL, rtol=0)
  np.testing.assert_allclose(got[real], _torch_logits(hf_model, ids, mask)[real], atol=PARITY_TOL, rtol=0)
  # The KL reference (adapters off, same base arrays): bit-identical while B = 0.
  np.testing.assert_array_equal(got, _logits(nnx.merge(reference_graphdef, frozen_params(lora)), ids, mask))
  adapters = dict(nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam)))
  assert len(adapters) == 2 * 7 * hf_model.config.num_hidden_layers  # A and B of q, k, v, o, gate, up, down


def test_adapters_follow_their_weights_logical_axes(tiny_checkpoints):
  """q_proj [E, H, D] on (fsdp, tensor, -): A [E, r] on (fsdp, -), B [r, H, D] on (-, tensor, -)."""
  lora, _ = apply_lora(from_pretrained(tiny_checkpoints["llama"][0], mesh=_mesh()), LoraSettings(rank=4))
  attn, mlp = lora.layers[0].attn, lora.layers[0].mlp
  spec = lambda variable: (*variable[...].sharding.spec, *(None,) * (variable.ndim - len(variable[...].sharding.spec)))
  assert (attn.q_proj_lora_a.shape, spec(attn.q_proj_lora_a)) == ((128, 4), ("fsdp", None))
  assert (attn.q_proj_lora_b.shape, spec(attn.q_proj_lora_b)) == ((4, 8, 16), (None, "tensor", None))
  assert (attn.o_proj_lora_a.shape, spec(attn.o_proj_lora_a)) == ((8, 16, 4), ("tensor", None, None))
  assert (attn.o_proj_lora_b.shape, spec(attn.o_proj_lora_b)) == ((4, 128), (None, "fsdp"))
  assert (mlp.down_proj_lora_a.shape, spec(mlp.down_proj_lora_a)) == ((256, 4), ("tensor", None))


def test_only_the_named_targets_get_adapters(tiny_checkpoints):
  lora, _ = apply_lora(from_pretrained(tiny_checkpoints["qwen2"][0]), LoraSettings(rank=2, targets="q,v,down"))
  names = {path[-1] for path, _ in nnx.to_flat_state(nnx.state(lora, nnx.LoRAParam))}
  assert names == {f"{w}_lora_{x}" for w in ("q_proj", "v_proj", "down_proj") for x in "ab"}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_merged_export_reproduces_the_lora_model_in_transformers(tiny_checkpoints, tmp_path, family):
  directory, hf_model = tiny_checkpoints[family]
  ids, mask = left_padded_batch(np.random.default_rng(1), 4, 16, hf_model.config.vocab_size)
  lora, _ = apply_lora(from_pretrained(directory, mesh=_mesh()), LoraSettings(rank=4, alpha=8.0), seed=2)
  _randomise_b(lora, seed=3)
  got = _logits(lora, ids, mask)
  real = mask.astype(bool)
  base = _torch_logits(hf_model, ids, mask)
  assert np.abs(got[real] - base[real]).max() > 100 * PARITY_TOL  # the adapters really change the logits

  save_pretrained(lora, tmp_path / "merged")
  exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  assert type(exported) is type(hf_model)
  np.testing.assert_allclose(_torch_logits(exported, ids, mask)[real], got[real], atol=PARITY_TOL, rtol=0)


def test_adapters_only_export_is_peft_layout(tiny_checkpoints, tmp_path):
  """adapter_model.safetensors: W_hf + (alpha / r)·lora_B·lora_A, applied in PyTorch to the base checkpoint,
  gives the LoRA model's logits."""
  directory, hf_model = tiny_checkpoints["qwen2"]
  settings = LoraSettings(rank=4, alpha=8.0, targets="q,k,v,o,gate,up,down")
  lora, _ = apply_lora(from_pretrained(directory, mesh=_mesh()), settings, seed=4)
  _randomise_b(lora, seed=5)
  ids, mask = left_padded_batch(np.random.default_rng(2), 4, 16, hf_model.config.vocab_size)
  got = _logits(lora, ids, mask)

  save_pretrained(lora, tmp_path / "adapters", adapters_only=True)
  config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
  tensors = safetensors.numpy.load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
  assert len(tensors) == 2 * 7 * hf_model.config.num_hidden_layers
  patched = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).eval()
  weights = dict(patched.named_parameters())
  with torch.no_grad():
    for name, lora_a in tensors.items():
      if name.endswith("lora_A.weight"):
        lora_b = tensors[name.replace("lora_A", "lora_B")]  # [out, r], lora_a [r, in]
        target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        weights[target] += torch.tensor(config["lora_alpha"] / config["r"] * lora_b @ lora_a)
  real = mask.astype(bool)
  np.testing.assert_allclose(_torch_logits(patched, ids, mask)[real], got[real], atol=PARITY_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Training: the learnable task of tests/test_learning.py, with adapters.



def test_lora_updates_raise_the_reward_and_train_only_adapters_and_head():
  mesh = make_mesh(1, 2, 4)
  base = init_model(CONFIG, mesh=mesh, seed=0)
  # A 0.02-scale random head gives near-flat logits that no hidden state can sharpen (|logit| ≤ |h|·|w| ≈ 0.6),
  # and LoRA leaves the head alone: a final norm scaled by 20 gives the base the logit range of a trained model.
  base.final_norm.scale.set_value(20 * base.final_norm.scale[...])
  model, reference_graphdef = apply_lora(base, LoraSettings(rank=4, alpha=8.0), seed=0)
  optimizer = make_optimizer(OptimConfig(learning_rate=3e-2, head_learning_rate=1e-2))
  graphdef, state = init_train_state(model, optimizer, proj_dim=8)
  frozen = frozen_params(model)
  lm_paths = {path for path, _ in nnx.to_flat_state(state.params["lm"])}
  assert lm_paths and all(path[-1].endswith(("_lora_a", "_lora_b")) for path in lm_paths)
  trained = sum(x.size for x in jax.tree.leaves(state.params))
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) < 3 * trained  # Adam's two moments (+ counts)
  frozen_before = jax.tree.map(np.asarray, frozen)

  state, rewards_per_step = train_on_the_task(graphdef, state, optimizer, mesh, frozen)
  first, last = np.mean(rewards_per_step[:3]), np.mean(rewards_per_step[-3:])
  assert first < 0.3, rewards_per_step  # near the random policy's 1/16
  assert last > first + 0.3, rewards_per_step
  b_max = {path: float(jnp.abs(v[...]).max()) for path, v in nnx.to_flat_state(state.params["lm"])
           if path[-1].endswith("_lora_b")}
  assert len(b_max) == 14 and min(b_max.values()) > 0, b_max  # every target's adapter was trained
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, frozen))  # base untouched
  # The reference (adapters off) is still the initial base model.
  ids = np.random.default_rng(1).integers(0, 16, (2, 5))
  np.testing.assert_allclose(_logits(nnx.merge(reference_graphdef, frozen), ids, np.ones_like(ids)),
                             _logits(base, ids, np.ones_like(ids)), atol=SAME_OP_TOL, rtol=0)
  print("mean reward per step:", np.round(rewards_per_step, 3))


# ---------------------------------------------------------------------------------------------
# Config: one line per bad value.


@pytest.mark.parametrize("field, value, message", [
    ("rank", -1, r"--config\.model\.lora\.rank=-1; use 0 \(no adapters"),
    ("alpha", 0.0, r"--config\.model\.lora\.alpha=0\.0; use a positive alpha"),
    ("targets", "q,vv", r"--config\.model\.lora\.targets names 'vv' \(did you mean 'v'\?\)"),
    ("targets", "q,q", r"--config\.model\.lora\.targets='q,q' names a projection twice"),
    ("export", "merge", r"--config\.model\.lora\.export='merge' is not allowed \(did you mean 'merged'\?\)"),
])
def test_bad_lora_settings_are_one_clear_error(field, value, message):
  config = run_config.defaults()
  config.model.lora[field] = value
  with pytest.raises(run_config.ConfigError, match=message) as error:
    run_config.build(config)
  assert "\n" not in str(error.value)


def test_lora_settings_reach_the_run_config():
  config = run_config.defaults()
  assert isinstance(config.model.lora, ml_collections.ConfigDict) and config.model.lora.rank == 0
  config.model.lora.rank, config.model.lora.targets = 8, "q, v"
  lora = run_config.build(config).model.lora
  assert (lora.rank, lora.target_names, lora.scale) == (8, ("q", "v"), 2.0)
