"""Flax NNX decoder for the Llama, Qwen2 and Qwen3 families, with a functional KV cache.

One forward serves training and sampling. Without a cache it is a teacher-forced pass over
[B, T] tokens. With a cache it writes the new keys/values at slots [cache.index, cache.index + T)
and attends to every filled slot at or before each query's slot (reading only the first
`cache.visible` slots when that is set). A `prefix` is the keys/values of prompts, returned by a
`return_kv=True` call. Without a cache, the tokens follow it in a teacher-forced pass (the prefix
expanded to one copy per row): the training forward of G responses that share one prompt encodes the
prompt once. With a cache, its rows continue the prefix's prompts, R consecutive rows per prompt: the
sampler prefills each prompt once (a cache-less `return_kv` call) and decodes its G rows against that one
copy of the prompt's keys and their own response slots. Positions come from the attention mask (count
of real tokens so far), so left padding never shifts RoPE.

The causal (cache-less) attention, hence the prefill, runs the splash kernel on TPU (model/splash.py) and
the blockwise XLA core elsewhere (model/attention.py); `attention` ("auto" | "xla" | "splash") chooses.

Shapes: B batch, T new tokens, S cache slots, E hidden, H query heads, K KV heads, D head dim,
F MLP width, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from mcpo_jax.mesh import constrain
from mcpo_jax.model.attention import cached_attention, causal_attention, grouped_cached_attention, quantize_int8
from mcpo_jax.model.config import ModelConfig, inverse_frequencies
from mcpo_jax.model.linear import linear

ATTENTION_BLOCK = 64  # query positions per block of the training-path attention (the XLA core)
ATTENTION_KERNELS = ("auto", "xla", "splash")  # auto: splash on TPU, XLA elsewhere
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")  # a cache's logical axes (its int8 scales: the first three)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def platform(mesh: Mesh | None) -> str:
  """The platform the model's arrays live on: the mesh's devices', else the default backend's."""
  return (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform


def splash_selected(kernel: str, mesh: Mesh | None) -> bool:
  """Whether causal attention runs the splash kernel: "auto" on TPU, "splash" anywhere (off TPU in Pallas's
  interpreter: slow, for tests), "xla" never."""
  return kernel == "splash" or (kernel == "auto" and platform(mesh) == "tpu")


@flax.struct.dataclass
class LayerKV:
  """One layer's keys and values. In [B, K, S, D], the layout both attention matmuls read directly, so decoding
  never transposes the cache (in [B, S, K, D] XLA:CPU copied every layer's whole cache, twice, at every step).
  An int8 cache (the sampler's `DecodePlan.int8_cache`) stores each slot's D numbers as int8 times one float32
  scale per slot and head (attention.quantize_int8): half the bytes a decode step reads, at ~0.4% error."""

  keys: jax.Array  # [B, K, S, D] compute dtype, or int8
  values: jax.Array  # [B, K, S, D]
  key_scales: jax.Array | None = None  # [B, K, S] float32 with an int8 cache, else None
  value_scales: jax.Array | None = None

  @property
  def quantized(self) -> bool:
    return self.key_scales is not None


@flax.struct.dataclass
class KVCache:
  """Preallocated keys and values of every layer; a pytree the sampler carries through its loop."""

  layers: tuple[LayerKV, ...]
  key_mask: jax.Array  # [B, S] bool: the slot holds a real (non-padding) token
  index: jax.Array  # [] int32: the next slot to write
  # Attention reads slots [0, visible) only (None: all S); static, so each value is its own program. The
  # sampler's decode segments set it to the slots filled by the segment's end (sampling.decode_segment_ends).
  visible: int | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def max_length(self) -> int:
    return self.key_mask.shape[1]


@flax.struct.dataclass
class ModelOutput:
  logits: jax.Array | None  # [B, T, V] float32, None when return_logits=False
  hidden: jax.Array  # [B, T, E] final normed hidden state (the LM head's input)
  cache: KVCache | None


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any,
           init: str = "normal") -> nnx.Param:
  """A parameter that carries its logical axis names (mcpo_jax.mesh maps them to mesh axes)."""
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (0.02 * jax.random.normal(rngs.params(), shape)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, param_dtype: Any, rngs: nnx.Rngs):
    self.scale = _param(rngs, (dim,), ("norm",), param_dtype, init="ones")
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    # Normalise in float32 and cast back before scaling, as the HF implementations do.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def lora_einsum(equation: str, x: jax.Array, weight: jax.Array) -> jax.Array:
  """x · weight as one einsum accumulated in float32, for the projections a LoRA model adapts: qwix's
  LoraProvider adds its adapter to exactly these einsums (model/lora.py). Every other weight matmul
  goes through `linear`, which qwix leaves alone."""
  return jnp.einsum(equation, x, weight, preferred_element_type=jnp.float32).astype(x.dtype)


def rotate_half_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """HF-style rotate-half RoPE. x: [B, T, N, D]; cos, sin: [B, T, D]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, mesh: Mesh | None, rngs: nnx.Rngs,
               attention: str = "auto"):
    e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), param_dtype)
    self.k_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.v_proj = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), param_dtype)
    self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), param_dtype)
    if config.attention_bias:
      self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), param_dtype, init="zeros")
      self.k_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), param_dtype, init="zeros")
      self.v_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), param_dtype, init="zeros")
    if config.qk_norm:
      self.q_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
      self.k_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.config, self.dtype, self.mesh, self.attention_kernel = config, dtype, mesh, attention
    self.lora_targets: frozenset[str] = frozenset()  # weights run through lora_einsum (set by model/lora.py)

  def _causal(self, q, k, v, key_mask, first_slot=0):
    """causal_attention's contract (model/attention.py) on the backend's kernel."""
    if splash_selected(self.attention_kernel, self.mesh):
      from mcpo_jax.model.splash import splash_attention  # Pallas' TPU modules load only when splash runs
      return splash_attention(q, k, v, key_mask, first_slot, mesh=self.mesh, interpret=platform(self.mesh) != "tpu")
    return causal_attention(q, k, v, key_mask, ATTENTION_BLOCK, first_slot)

  def _project(self, x: jax.Array, name: str) -> jax.Array:
    weight = getattr(self, f"{name}_proj")[...].astype(self.dtype)  # [E, N, D]
    if f"{name}_proj" in self.lora_targets:
      out = lora_einsum("bte,end->btnd", x, weight)  # [B, T, N, D]
    else:
      out = linear(x, weight.reshape(weight.shape[0], -1)).reshape(*x.shape[:-1], *weight.shape[1:])  # [B, T, N, D]
    if self.config.attention_bias:
      out = out + getattr(self, f"{name}_bias")[...].astype(self.dtype)
    return out

  def __call__(self, x, cos, sin, query_slots, key_mask, write_index, cache: LayerKV | None = None,
               prefix: LayerKV | None = None, prefix_mask=None):
    """x: [B, T, E]; query_slots: [T]; key_mask: [B, S]; cache: this layer's [B, K, S, D] or None;
    prefix: a shared prompt's [B, K, P, D] or None (S = P + T); with a cache: [B/R, K, P, D], the prompts that the
    cache's rows continue, R rows each, with prefix_mask [B/R, P] (sampling).

    Returns the attention output [B, T, E] and the layer's keys and values (the cache with this call's written
    in, or else this call's [B, K, T, D]).
    """
    cfg = self.config
    q = self._project(x, "q")  # [B, T, H, D]
    k = self._project(x, "k")  # [B, T, K, D]
    v = self._project(x, "v")  # [B, T, K, D]
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rotate_half_rope(q, cos, sin)
    k = rotate_half_rope(k, cos, sin).transpose(0, 2, 1, 3)  # [B, K, T, D]
    v = v.transpose(0, 2, 1, 3)  # [B, K, T, D]
    new_kv = LayerKV(k, v) if cache is None else _written(cache, k, v, write_index, self.mesh)

    # Queries grouped by KV head, so both attention products are plain batched matmuls over (B, K).
    b, t, h, d = q.shape
    kv_heads, groups = cfg.num_kv_heads, h // cfg.num_kv_heads
    q = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    if cache is not None:  # over the slots key_mask covers: the cache's first `visible` (KVCache.visible)
      own = jax.tree.map(lambda x: x[:, :, :key_mask.shape[1]], new_kv)  # int8 slots convert exactly
      own_keys, own_values = own.keys.astype(self.dtype), own.values.astype(self.dtype)
      if prefix is None:
        out = cached_attention(q, own_keys, own_values, query_slots, key_mask, own.key_scales, own.value_scales)
      else:  # rows that continue shared prompts: each prompt's keys once, then the row's own slots
        out = grouped_cached_attention(q, prefix.keys.astype(self.dtype), prefix.values.astype(self.dtype),
                                       prefix_mask, own_keys, own_values, query_slots, key_mask, own.key_scales,
                                       own.value_scales)
    elif prefix is not None:  # teacher-forced after a shared prompt: keys [prompt; own tokens]
      k_all = jnp.concatenate([prefix.keys.astype(self.dtype), k.astype(self.dtype)], axis=2)  # [B, K, P + T, D]
      v_all = jnp.concatenate([prefix.values.astype(self.dtype), v.astype(self.dtype)], axis=2)
      out = self._causal(q, k_all, v_all, key_mask, prefix.keys.shape[2])
    else:  # teacher-forced (training): blockwise, memory linear in T
      out = self._causal(q, k.astype(self.dtype), v.astype(self.dtype), key_mask)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)  # [B, K, G, T, D] -> [B, T, H, D]
    out = constrain(out, self.mesh, ("batch", "length", "heads", "head_dim"))
    if "o_proj" in self.lora_targets:
      return lora_einsum("bthd,hde->bte", out, self.o_proj[...].astype(self.dtype)), new_kv
    # One [B·T, H·D]·[H·D, E] matmul: einsum would contract (d, h) in letter order and transpose both sides.
    o_proj = self.o_proj[...].astype(self.dtype).reshape(h * d, -1)
    return linear(out.reshape(b, t, h * d), o_proj), new_kv


def _written(cache: LayerKV, k: jax.Array, v: jax.Array, index: jax.Array, mesh: Mesh | None) -> LayerKV:
  """The layer's cache with this call's keys and values k, v [B, K, T, D] in slots [index, index + T)."""
  def write(store, x):  # store [B, K, S(, D)], x [B, K, T(, D)]
    store = jax.lax.dynamic_update_slice_in_dim(store, x.astype(store.dtype), index, axis=2)
    return constrain(store, mesh, CACHE_AXES[:store.ndim])
  if not cache.quantized:
    return cache.replace(keys=write(cache.keys, k), values=write(cache.values, v))
  (k, key_scales), (v, value_scales) = quantize_int8(k), quantize_int8(v)
  return LayerKV(write(cache.keys, k), write(cache.values, v), write(cache.key_scales, key_scales),
                 write(cache.value_scales, value_scales))


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, mesh: Mesh | None, rngs: nnx.Rngs):
    e, f = config.hidden_size, config.intermediate_size
    self.gate_proj = _param(rngs, (e, f), ("embed", "mlp"), param_dtype)
    self.up_proj = _param(rngs, (e, f), ("embed", "mlp"), param_dtype)
    self.down_proj = _param(rngs, (f, e), ("mlp", "embed"), param_dtype)
    self.dtype, self.mesh = dtype, mesh
    self.lora_targets: frozenset[str] = frozenset()  # weights run through lora_einsum (set by model/lora.py)

  def _matmul(self, x: jax.Array, name: str) -> jax.Array:  # [B, T, in] -> [B, T, out]
    weight = getattr(self, name)[...].astype(self.dtype)
    return lora_einsum("bti,io->bto", x, weight) if name in self.lora_targets else linear(x, weight)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, E] -> [B, T, E]
    gate, up = self._matmul(x, "gate_proj"), self._matmul(x, "up_proj")
    # [B, T, F]; "mlp_rows" is the batch unless a decode remaps it (sampling.MLP_OVER_FSDP): then XLA gathers
    # the rows to meet the split weights, rather than gathering the weights.
    inner = constrain(jax.nn.silu(gate) * up, self.mesh, ("mlp_rows", "length", "mlp"))
    return self._matmul(inner, "down_proj")


class Block(nnx.Module):
  def __init__(self, config: ModelConfig, *, dtype: Any, param_dtype: Any, mesh: Mesh | None, rngs: nnx.Rngs,
               attention: str = "auto"):
    kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rngs=rngs)
    self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = Attention(config, attention=attention, **kw)
    self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = MLP(config, **kw)
    self.mesh = mesh

  def __call__(self, x, cos, sin, query_slots, key_mask, write_index, cache=None, prefix=None, prefix_mask=None):
    attn_out, new_kv = self.attn(self.input_norm(x), cos, sin, query_slots, key_mask, write_index, cache, prefix,
                                 prefix_mask)
    x = constrain(x + attn_out, self.mesh, ("batch", "length", None))
    x = constrain(x + self.mlp(self.post_attention_norm(x)), self.mesh, ("batch", "length", None))
    return x, new_kv


class Transformer(nnx.Module):
  """Decoder-only LM. `model(input_ids, attention_mask)` -> ModelOutput(logits, hidden, cache)."""

  def __init__(self, config: ModelConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               remat: str = "none", mesh: Mesh | None = None, attention: str = "auto", rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
    if attention not in ATTENTION_KERNELS:
      raise ValueError(f"attention={attention!r}; choose one of {list(ATTENTION_KERNELS)}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, rngs=rngs)
    self.embed = _param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype)
    self.layers = nnx.List([Block(config, attention=attention, **kw) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype)
    self.config, self.dtype, self.remat, self.mesh = config, jnp.dtype(dtype), remat, mesh
    self.attention_kernel = attention

  def init_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
    """An empty cache of `max_length` slots, in `dtype` (default: the compute dtype; int8: quantized, LayerKV)."""
    cfg = self.config
    dtype = jnp.dtype(dtype or self.dtype)
    shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
    zeros = lambda shape, dtype: constrain(jnp.zeros(shape, dtype), self.mesh, CACHE_AXES[:len(shape)])
    scales = lambda: zeros(shape[:3], jnp.float32) if dtype == jnp.int8 else None
    layer = lambda: LayerKV(zeros(shape, dtype), zeros(shape, dtype), scales(), scales())
    return KVCache(layers=tuple(layer() for _ in range(cfg.num_layers)),
                   key_mask=jnp.zeros((batch_size, max_length), bool), index=jnp.zeros((), jnp.int32))

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """LM head in float32: [B, T, E] -> [B, T, V]. Separate so a trainer can chunk over T."""
    head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
    logits = linear(hidden, head.astype(self.dtype), jnp.float32)
    return constrain(logits, self.mesh, ("batch", "length", "vocab"))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               cache: KVCache | None = None, prefix: KVCache | None = None, return_logits: bool = True,
               return_kv: bool = False) -> ModelOutput:
    """input_ids, attention_mask: int [B, T] (mask 1 = real token, 0 = padding).

    cache: a KV cache to write into and attend over (sampling). prefix: keys/values [B, K, P, D] of a
    prompt these tokens follow (training with a shared prompt); with a cache, the B/R prompts that the
    cache's B rows continue, R consecutive rows each (sampling: each prompt's keys are held and read once
    for its R rows). return_kv: without a cache, return this call's keys/values as `cache` (a prompt to
    be used as a prefix; the sampler's prefill).
    """
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    attention_mask = attention_mask.astype(bool)
    if prefix is not None and return_kv:
      raise ValueError("a prefix call (tokens after a shared prompt) returns no keys/values of its own.")
    if cache is not None:
      write_index = cache.index
      key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, attention_mask, write_index, axis=1)
      tokens_before = jnp.sum(cache.key_mask, axis=1, keepdims=True)  # [B, 1]
      if prefix is not None:  # rows continuing their prompts (own slots from 0): the prompt's tokens come first
        prompts = prefix.key_mask.shape[0]
        if b % prompts:
          raise ValueError(f"{b} rows cannot continue {prompts} prompts in equal groups.")
        tokens_before = tokens_before + jnp.repeat(jnp.sum(prefix.key_mask, axis=1), b // prompts)[:, None]
    elif prefix is not None:
      write_index = jnp.asarray(prefix.max_length, jnp.int32)
      key_mask = jnp.concatenate([prefix.key_mask, attention_mask], axis=1)  # [B, P + T]
      tokens_before = jnp.sum(prefix.key_mask, axis=1, keepdims=True)  # [B, 1]
    else:
      write_index, key_mask, tokens_before = jnp.zeros((), jnp.int32), attention_mask, 0
    # A token's position is the number of real tokens before it in its row.
    positions = tokens_before + jnp.cumsum(attention_mask, axis=1) - 1  # [B, T]
    inv_freq = inverse_frequencies(self.config)  # [D/2] float32, a compile-time constant
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, D]
    cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
    query_slots = write_index + jnp.arange(t)  # [T]

    x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)  # [B, T, E]
    x = constrain(x, self.mesh, ("batch", "length", None))
    attend_mask = key_mask if cache is None or cache.visible is None else key_mask[:, :cache.visible]
    new_layers = []
    for i, layer in enumerate(self.layers):
      x, kv = self._apply_layer(layer, x, cos, sin, query_slots, attend_mask, write_index,
                                None if cache is None else cache.layers[i], None if prefix is None else prefix.layers[i],
                                None if prefix is None else prefix.key_mask)
      new_layers.append(kv)
    hidden = self.final_norm(x)  # [B, T, E]

    new_cache = None if cache is None and not return_kv else KVCache(
        layers=tuple(new_layers), key_mask=key_mask, index=write_index + t,
        visible=None if cache is None else cache.visible)
    logits = self.logits_from_hidden(hidden) if return_logits else None
    return ModelOutput(logits=logits, hidden=hidden, cache=new_cache)

  def _apply_layer(self, layer: Block, *args):
    if self.remat == "none":
      return layer(*args)
    # A pure jax.checkpoint over the layer's state, not nnx.remat: nnx.remat writes the state back to
    # the outer Variables, which is illegal inside the sampler's while_loop and the update's scan.
    graphdef, state = nnx.split(layer)
    apply = lambda state, *args: nnx.merge(graphdef, state)(*args)
    return jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat])(state, *args)


def init_model(config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None, **kwargs) -> Transformer:
  """A randomly initialised model, its parameters sharded on `mesh` (tests and benchmarks)."""
  from mcpo_jax.model.weights import shard_model  # weights imports this module
  model = Transformer(config, mesh=mesh, rngs=nnx.Rngs(seed), **kwargs)
  return shard_model(model, mesh) if mesh is not None else model

