"""Shared test setup: 8 fake CPU devices, offline hub, tiny random checkpoints written by transformers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (installed for the AOT tests) is not a backend here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mcpo_jax.tpu_flags import set_tpu_flags  # noqa: E402

set_tpu_flags()  # the AOT tests compile for TPU as run.py would

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
def tiny_model_dir(tmp_path_factory):
  """A 2-layer random Llama with the SmolLM2 vocabulary and tokenizer (so prompts and verifiers are real)."""
  import shutil
  from pathlib import Path

  from mcpo_jax.model import resolve_checkpoint
  directory = tmp_path_factory.mktemp("tiny_smollm")
  write_tiny_checkpoint("llama", directory, vocab_size=49152, hidden_size=64, intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        bos_token_id=1, eos_token_id=2)
  smollm = Path(resolve_checkpoint("smollm2-135m-instruct"))
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (smollm / name).exists():
      shutil.copy(smollm / name, directory / name)
  return directory


LEARNABLE_VOCAB = ["<pad>", "<|im_start|>", "<|im_end|>", "[UNK]", "user", "assistant", *"0123456789"]
LEARNABLE_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def learnable_task(tmp_path_factory):
  """A world the RL loop can learn in a few steps: (model dir, `--config.data.domains` value).

  A 2-layer random Llama over a 16-token word-level vocabulary (digits, chat markers; every other
  word is [UNK]) and two JSONL domains whose answer is a constant digit: "three" prompts start with
  "0 0 0" and are answered 3, "seven" prompts start with "9 9 9" and are answered 7. With one new
  token the random policy is right about 1/16 of the time.
  """
  import json

  import tokenizers
  import transformers
  from tokenizers import models, pre_tokenizers
  root = tmp_path_factory.mktemp("learnable")
  write_tiny_checkpoint("llama", root / "model", vocab_size=len(LEARNABLE_VOCAB), hidden_size=64,
                        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
  word_level = tokenizers.Tokenizer(models.WordLevel({t: i for i, t in enumerate(LEARNABLE_VOCAB)}, unk_token="[UNK]"))
  word_level.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                      pre_tokenizers.Digits(individual_digits=True)])
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="<pad>",
                                                   bos_token="<|im_start|>", eos_token="<|im_end|>",
                                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
  tokenizer.chat_template = LEARNABLE_TEMPLATE
  tokenizer.save_pretrained(str(root / "model"))
  rng = np.random.default_rng(0)
  domains = {}
  for name, lead, answer in (("three", "0 0 0", "3"), ("seven", "9 9 9", "7")):
    for split in ("train", "test"):
      rows = [{"question": f"{lead} " + " ".join(map(str, rng.integers(0, 10, 5))), "answer": answer}
              for _ in range(64)]
      (root / f"{name}_{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    domains[name] = {"source": {"kind": "jsonl", "fields": {"prompt": "question", "answer": "answer"},
                                "path": {s: str(root / f"{name}_{s}.jsonl") for s in ("train", "test")}},
                     "verifier": "exact"}
  return root / "model", repr(domains)


def learnable_flags(learnable_task, steps: int) -> list[str]:
  """run.py overrides (on the tiny preset) that train on `learnable_task` for `steps` steps."""
  model_dir, domains = learnable_task
  return [f"--config.model.name={model_dir}", f"--config.data.domains={domains}", "--config.rewards.processes=0",
          "--config.rollout.max_new_tokens=1", "--config.eval.max_new_tokens=1", "--config.optim.learning_rate=1e-2",
          "--config.objective.kl_coef=0", "--config.data.prompts_per_step=4", "--config.rollout.group_size=8",
          "--config.eval.prompts_per_domain=8", f"--config.train.steps={steps}"]


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


def tiny_pod_run(tmp_path_factory, name: str):
  """The tiny preset's RunConfig over a random 2-layer Qwen2 checkpoint, with the paper presets' TPU settings
  (bf16 compute, remat full, a scan over 2 micro-batches): what the AOT tests compile for TPU topologies."""
  from configs.multi_domain import get_config
  from mcpo_jax import config as config_lib
  directory = tmp_path_factory.mktemp(name)
  write_tiny_checkpoint("qwen2", directory)
  config = get_config("tiny")
  config.model.name = str(directory)
  config.model.dtype = "bfloat16"
  config.model.remat = "full"
  config.data.prompts_per_step = 4
  config.train.micro_batches = 2
  return config_lib.build(config)
