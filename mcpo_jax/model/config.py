"""Architecture hyper-parameters of the supported decoder families, read from and written to HF config.json."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
  """A checkpoint's config.json that this project cannot run, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the decoder needs to know about its shape; hashable so it can be a static jit argument."""

  model_type: str  # "llama" | "qwen2" | "qwen3"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Rope scaling as a sorted tuple of (key, value) so the config stays hashable; () = none.
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
  qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  @property
  def rope_type(self) -> str:
    return dict(self.rope_scaling).get("rope_type", "default")

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
    """Parses a transformers config dict (v4 `rope_scaling`/`rope_theta` or v5 `rope_parameters`)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ModelConfigError(
          f"{source}: model_type={model_type!r} is not supported; supported model types are "
          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama / Qwen2 / Qwen3 families).")
    if hf.get("hidden_act", "silu") != "silu":
      raise ModelConfigError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported.")
    if hf.get("use_sliding_window", False):
      raise ModelConfigError(f"{source}: use_sliding_window=true is not supported; set it to false.")
    if hf.get("mlp_bias", False):
      raise ModelConfigError(f"{source}: mlp_bias=true is not supported; only bias-free MLPs are.")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
      raise ModelConfigError(f"{source}: missing field(s) {', '.join(missing)}; present: {', '.join(sorted(hf))}.")

    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if "type" in rope and "rope_type" not in rope:  # transformers v4 spelling
      rope["rope_type"] = rope.pop("type")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ModelConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}.")
    rope_scaling = () if rope_type == "default" else tuple(sorted(rope.items()))

    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    eos = hf.get("eos_token_id")
    return cls(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The config.json transformers needs to rebuild this architecture."""
    architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    rope_parameters = {"rope_type": "default", **dict(self.rope_scaling), "rope_theta": self.rope_theta}
    hf = {
        "architectures": [architectures[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        # Both spellings, so that transformers v4 and v5 read the same rope.
        "rope_theta": self.rope_theta,
        "rope_scaling": rope_parameters if self.rope_scaling else None,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        "torch_dtype": "float32",
    }
    if self.model_type == "llama":
      hf.update(attention_bias=self.attention_bias, mlp_bias=False)
    if self.model_type in ("qwen2", "qwen3"):
      hf.update(use_sliding_window=False, sliding_window=None)
    if self.model_type == "qwen3":
      hf.update(attention_bias=self.attention_bias)
    return hf

  @property
  def num_params(self) -> int:
    attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.hidden_size * self.intermediate_size
    embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * (attn + mlp) + embed

  def validate_for_mesh(self, tensor_parallel: int) -> None:
    """Head counts must split evenly over the tensor axis (KV heads are replicated when they cannot)."""
    if self.num_heads % tensor_parallel:
      divisors = [d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]
      raise ModelConfigError(
          f"num_attention_heads={self.num_heads} does not split over mesh.tensor={tensor_parallel}; "
          f"choose mesh.tensor in {divisors}.")


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """RoPE inverse frequencies [head_dim/2], float32 like transformers, with Llama-3 / linear scaling."""
  exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
  inv = (1.0 / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
  scaling = dict(config.rope_scaling)
  if config.rope_type == "linear":
    return (inv / np.float32(scaling["factor"])).astype(np.float32)
  if config.rope_type == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(in_band, interpolated, scaled).astype(np.float32)
  return inv
