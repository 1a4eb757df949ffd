"""Shared test setup: 8 fake CPU devices, offline hub, tiny random checkpoints written by transformers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY_DIMS = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)


def tiny_hf_config(family: str, **overrides):
  """A small transformers config per family (4 KV heads so a tensor axis of 4 really splits them)."""
  import transformers
  dims = TINY_DIMS | overrides
  if family == "llama":  # Llama-3 style rope scaling, untied head
    return transformers.LlamaConfig(
        **({"tie_word_embeddings": False} | dims), rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})
  if family == "qwen2":  # q/k/v bias, tied embeddings
    return transformers.Qwen2Config(**({"tie_word_embeddings": True} | dims), rope_theta=1e6)
  if family == "qwen3":  # q/k norm, explicit head_dim different from hidden/heads
    return transformers.Qwen3Config(**({"tie_word_embeddings": False, "head_dim": 32} | dims))
  raise ValueError(family)


def write_tiny_checkpoint(family: str, directory, seed: int = 0, **overrides):
  """Saves a randomly initialised transformers model (weights perturbed off their init) and returns it."""
  import torch
  import transformers
  classes = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
             "qwen3": transformers.Qwen3ForCausalLM}
  torch.manual_seed(seed)
  model = classes[family](tiny_hf_config(family, **overrides)).eval()
  with torch.no_grad():  # norms start at 1 and biases at 0: perturb so every tensor matters
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  model.save_pretrained(str(directory))
  return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
  """family -> (checkpoint directory, the transformers model)."""
  root = tmp_path_factory.mktemp("checkpoints")
  return {family: (root / family, write_tiny_checkpoint(family, root / family))
          for family in ("llama", "qwen2", "qwen3")}


def left_padded_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, pads=(0, 3, 7, 0)):
  """Random token ids [B, T] and a mask with a different amount of left padding per row."""
  ids = rng.integers(0, vocab, (batch, length))
  mask = np.ones((batch, length), np.int64)
  for row in range(batch):
    mask[row, :pads[row % len(pads)]] = 0
  return ids, mask
