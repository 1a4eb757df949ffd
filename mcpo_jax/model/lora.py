"""LoRA policies through qwix: low-rank adapters on chosen projections, the base weights frozen.

`apply_lora` marks the target projections, whose matmuls then run as einsums (transformer.lora_einsum),
and hands the model to qwix.apply_lora_to_model with a LoraProvider whose rule matches the einsums of
the attention and MLP modules only: qwix adds (alpha / rank)·x·A·B to each einsum whose weight operand
is a Param of the module, creating A (he-uniform) and B (zeros) beside the weight as nnx.LoRAParam on
that first call. Every other weight matmul goes through linear.py, which the rule does not match, so
`targets="q,v"` adapts q and v only although q, k, v and o share one module. The first call runs under
jit: qwix finds the weight by walking the traced operand back to its Param (an eager call in a
compute dtype other than the param dtype could not tell k from v, whose shapes agree).

A target W [in..., out...] gets A [in..., r] and B [r, out...] (our weights keep their input axes
first), and the adapters take W's logical axes on those dimensions, the rank axis unsharded. Dropout
is 0: the update's ratio π/π_old must compare the policy that sampled with the same policy.

The reference policy of the KL term is the base model with the adapters off: the graphdef that
`apply_lora` returns beside the LoRA model, over the same base weights (no copy).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import qwix
import safetensors.numpy
from etils import epath
from flax import nnx

from mcpo_jax.mesh import constrain, to_host
from mcpo_jax.model.transformer import Transformer

# Target name -> (the module holding the weight, the weight); a weight W [in..., out...].
TARGETS = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"), "o": ("attn", "o_proj"),
           "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}
EXPORTS = ("merged", "adapters")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  rank: int = 0  # 0: no adapters, every weight trains
  alpha: float = 16.0  # an adapter adds (alpha / rank)·A·B to its weight
  targets: str = "q,k,v,o,gate,up,down"  # comma-separated names of TARGETS
  export: str = "merged"  # hf_export: "merged" (a plain HF directory) or "adapters" alone (PEFT's layout)

  @property
  def target_names(self) -> tuple[str, ...]:
    return tuple(name.strip() for name in self.targets.split(","))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def has_adapters(model: Transformer) -> bool:
  return getattr(model, "lora", None) is not None


def apply_lora(model: Transformer, settings: LoraSettings, *, seed: int = 0) -> tuple[Transformer, nnx.GraphDef]:
  """(the LoRA model, the graphdef of its base with the adapters off).

  The LoRA model computes the base model's logits exactly while B is zero; nnx.merge(base graphdef,
  frozen_params(lora model)) is the base model over the same arrays.
  """
  unknown = sorted(set(settings.target_names) - set(TARGETS))
  if settings.rank <= 0 or unknown:
    raise ValueError(f"LoRA needs a positive rank and targets among {sorted(TARGETS)}; got rank={settings.rank}, "
                     f"unknown targets {unknown}.")
  base = nnx.clone(model)  # shares the arrays
  base.set_attributes(lora_targets=frozenset(TARGETS[name][1] for name in settings.target_names))
  base_graphdef = nnx.graphdef(base)
  base.set_attributes(remat="none")  # qwix makes no adapter for an einsum inside jax.checkpoint: create them plainly
  creation_graphdef = nnx.graphdef(base)
  modules = "|".join(sorted({TARGETS[name][0] for name in settings.target_names}))
  provider = qwix.LoraProvider(module_path=rf"layers/\d+/({modules})", op_names=("einsum",), rank=settings.rank,
                               alpha=settings.alpha)
  tokens = jnp.zeros((1, 1), jnp.int32)  # the first call creates the adapters; its values do not matter
  base_state = nnx.state(base)

  def adapted(state: nnx.State) -> Transformer:
    lora_model = qwix.apply_lora_to_model(nnx.merge(creation_graphdef, state), provider, tokens, rngs=nnx.Rngs(seed))
    for path, module in nnx.iter_modules(lora_model):
      for weight in sorted(getattr(module, "lora_targets", ())):
        if hasattr(module, weight):
          _shard_adapters(module, weight, lora_model.mesh, path)
    return lora_model

  # The structure from an abstract pass, the adapters' values from a jitted one that returns them alone:
  # the base weights never pass through a jit output, so they are not copied.
  lora_graphdef = nnx.graphdef(nnx.eval_shape(adapted, base_state))
  adapters = jax.jit(lambda state: nnx.state(adapted(state), nnx.LoRAParam))(base_state)
  lora_model = nnx.merge(lora_graphdef, adapters, base_state)
  lora_model.lora, lora_model.remat = settings, model.remat
  return lora_model, base_graphdef


def _shard_adapters(module: nnx.Module, weight: str, mesh, path) -> None:
  """A [in..., r] and B [r, out...] take W's logical axes on their in / out dimensions (qwix copies W's
  metadata unchanged) and are placed by them."""
  if not hasattr(module, f"{weight}_lora_a"):
    raise RuntimeError(f"qwix created no adapter for {'/'.join(map(str, path))}/{weight}")
  axes = getattr(module, weight).logical_axes
  a, b = getattr(module, f"{weight}_lora_a"), getattr(module, f"{weight}_lora_b")
  for variable, variable_axes in ((a, (*axes[:a.ndim - 1], None)), (b, (None, *axes[len(axes) - b.ndim + 1:]))):
    variable.set_metadata("logical_axes", variable_axes)
    variable.set_value(constrain(variable[...], mesh, variable_axes))


def frozen_params(model: Transformer) -> nnx.State | None:
  """The base weights a LoRA model does not train (outside the optimizer and the checkpoint); None
  when every weight trains."""
  return nnx.state(model, nnx.Not(nnx.LoRAParam)) if has_adapters(model) else None


def _adapted(model: Transformer):
  """(weight path, W, A, B) for every adapted weight of a LoRA model."""
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, weight in params.items():
    lora_a = params.get((*path[:-1], f"{path[-1]}_lora_a"))
    if lora_a is not None:
      yield path, weight, lora_a, params[(*path[:-1], f"{path[-1]}_lora_b")]


def merge_adapters(model: Transformer) -> Transformer:
  """A plain Transformer whose adapted weights are W + (alpha / rank)·A·B (computed in float32)."""
  plain = nnx.eval_shape(lambda: Transformer(model.config, dtype=model.dtype, remat=model.remat, mesh=model.mesh,
                                             attention=model.attention_kernel,
                                             rngs=nnx.Rngs(0)))
  adapters = {path: (lora_a, lora_b) for path, _, lora_a, lora_b in _adapted(model)}
  flat = []
  for path, weight in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))):
    if path in adapters:
      lora_a, lora_b = (x[...].astype(jnp.float32) for x in adapters[path])
      delta = jnp.tensordot(lora_a, lora_b, axes=1)  # [in..., r]·[r, out...] -> W's shape
      weight = weight.replace((weight[...].astype(jnp.float32) + model.lora.scale * delta).astype(weight.dtype))
    flat.append((path, weight))
  return nnx.merge(nnx.graphdef(plain), nnx.from_flat_state(flat))


def save_adapters(model: Transformer, directory: str | os.PathLike, *, dtype=np.float32) -> epath.Path:
  """The adapters alone in PEFT's layout: adapter_model.safetensors (lora_A [r, in], lora_B [out, r] per
  target, HF names) and adapter_config.json. Every process must call this; process 0 writes."""
  from mcpo_jax.model.weights import hf_tensor_specs  # weights imports transformer, as this module does
  specs = hf_tensor_specs(model.config)
  tensors = {}
  for path, _, lora_a, lora_b in _adapted(model):
    prefix = "base_model.model." + specs[path][0].removesuffix(".weight")
    rank = lora_b.shape[0]
    tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(to_host(lora_a[...]).reshape(-1, rank).T.astype(dtype))
    tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(to_host(lora_b[...]).reshape(rank, -1).T.astype(dtype))
  directory = epath.Path(directory)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    settings = model.lora
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": settings.rank, "lora_alpha": settings.alpha,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "target_modules": [TARGETS[name][1] for name in settings.target_names]}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
  return directory
