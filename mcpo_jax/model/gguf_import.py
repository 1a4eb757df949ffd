"""GGUF (llama.cpp) Llama checkpoints -> a cached HF directory (config.json + safetensors + tokenizer).

Converting once to the HF layout means every checkpoint then loads through the same sharded
safetensors path. llama.cpp stores the Q and K projections with rows permuted for its interleaved
RoPE; we undo that so HF's rotate-half RoPE applies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import safetensors.numpy

from mcpo_jax.model.tokenizer import tokenizer_from_gguf

CACHE_ENV = "MCPO_JAX_CACHE"

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def cache_root() -> Path:
  return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mcpo_jax"))


def undo_rope_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """[heads·D, E] rows from llama.cpp's (pair-interleaved) order back to HF's (half-split) order.

  llama.cpp's converter maps, within each head, row (half h, index i) to row (i, half h); the
  inverse regroups each head's rows as [D/2, 2] and swaps the two axes.
  """
  rows, cols = weight.shape
  head_dim = rows // num_heads
  return weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _hf_config(reader: gguf.GGUFReader, has_output: bool) -> dict:
  arch = reader.fields["general.architecture"].contents()
  if arch != "llama":
    raise ValueError(f"GGUF general.architecture={arch!r}; only 'llama' GGUF files are supported "
                     "(use an HF safetensors directory for other families).")

  def get(key, default=None):
    field = reader.fields.get(f"llama.{key}") or reader.fields.get(key)
    return default if field is None else field.contents()

  heads = get("attention.head_count")
  hidden = get("embedding_length")
  vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].contents())
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": int(vocab),
      "hidden_size": int(hidden),
      "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")),
      "num_attention_heads": int(heads),
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": int(get("rope.dimension_count", hidden // heads)),
      "hidden_act": "silu",
      # GGUF stores float32; print it back at float32 precision (9.99999974e-06 -> 1e-05).
      "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.7g}"),
      "rope_theta": float(f"{get('rope.freq_base', 10000.0):.7g}"),
      "max_position_embeddings": int(get("context_length", 8192)),
      "tie_word_embeddings": not has_output,
      "bos_token_id": get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": get("tokenizer.ggml.eos_token_id"),
      "pad_token_id": get("tokenizer.ggml.padding_token_id"),
      "torch_dtype": "float32",
  }


def _hf_name(gguf_name: str) -> str:
  stem, suffix = gguf_name.rsplit(".", 1)  # "blk.3.attn_q", "weight"
  if stem in _GLOBAL_TENSORS:
    return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
  _, layer, kind = stem.split(".")
  return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
  """Dequantises every tensor to float32 and writes an HF Llama directory with its tokenizer."""
  reader = gguf.GGUFReader(str(gguf_path))
  config = _hf_config(reader, has_output=any(t.name == "output.weight" for t in reader.tensors))
  tensors = {}
  for tensor in reader.tensors:
    # dequantize returns the numpy (row-major) shape, i.e. GGUF's dims reversed: [out, in].
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    weight = weight.reshape([int(d) for d in reversed(tensor.shape)])
    if tensor.name.endswith("attn_q.weight"):
      weight = undo_rope_permutation(weight, config["num_attention_heads"])
    elif tensor.name.endswith("attn_k.weight"):
      weight = undo_rope_permutation(weight, config["num_key_value_heads"])
    tensors[_hf_name(tensor.name)] = np.ascontiguousarray(weight)
  output_dir = Path(output_dir)
  output_dir.parent.mkdir(parents=True, exist_ok=True)
  # This process's own partial directory: two jobs converting on first use at once (two runs started side by
  # side on a fresh machine) must not write into one directory.
  partial = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=output_dir.name + ".partial-"))
  try:
    safetensors.numpy.save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_from_gguf(reader).save_pretrained(str(partial))
    partial.rename(output_dir)  # atomic: a crash mid-conversion never leaves a half-written cache
  except OSError:
    if not (output_dir / "model.safetensors").exists():
      raise
    # another process finished the same conversion first; its directory is the cache
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return output_dir


def cached_hf_directory(gguf_path: str | os.PathLike) -> Path:
  """The converted HF directory of `gguf_path`, converting on first use (keyed by file size and mtime)."""
  gguf_path = Path(gguf_path)
  if not gguf_path.is_file():
    raise FileNotFoundError(f"GGUF file {gguf_path} does not exist.")
  stat = gguf_path.stat()
  key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
  target = cache_root() / f"{gguf_path.stem}-{key}"
  if not target.exists():
    logging.info("converting %s to an HF directory in %s (once)", gguf_path, target)
    convert_gguf(gguf_path, target)
  return target
