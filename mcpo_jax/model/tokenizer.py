"""Tokenizers: transformers' AutoTokenizer for HF directories, and one built from a GGUF vocabulary."""

from __future__ import annotations

import os

import gguf
import tokenizers
import transformers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

GGUF_CONTROL_TOKEN = 3  # llama.cpp token type of special tokens such as <|im_start|>
GGUF_USER_DEFINED_TOKEN = 4


def _field(reader: gguf.GGUFReader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> transformers.PreTrainedTokenizerFast:
  """Byte-level BPE tokenizer from a GGUF file's vocabulary, merges, special tokens and chat template.

  Pre-tokenisation follows llama.cpp's `tokenizer.ggml.pre`: "smollm" (like StarCoder) splits every
  digit into its own token before the GPT-2 split; the others use the plain GPT-2 split.
  """
  model_kind = _field(reader, "tokenizer.ggml.model")
  if model_kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={model_kind!r}; only byte-level BPE ('gpt2') vocabularies are "
                     "supported here. Convert the checkpoint to an HF directory with its tokenizer.json instead.")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  token_types = _field(reader, "tokenizer.ggml.token_type")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

  backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                            fuse_unk=False, byte_fallback=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "codeshell"):
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    backend.pre_tokenizer = byte_level
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([
      AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, token_types) if kind == GGUF_CONTROL_TOKEN])
  backend.add_tokens([
      AddedToken(t, special=False, normalized=False)
      for t, kind in zip(tokens, token_types) if kind == GGUF_USER_DEFINED_TOKEN])

  def token(key: str) -> str | None:
    index = _field(reader, f"tokenizer.ggml.{key}_token_id")
    return None if index is None else tokens[index]

  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend,
      bos_token=token("bos"), eos_token=token("eos"), unk_token=token("unknown"), pad_token=token("padding"),
      chat_template=_field(reader, "tokenizer.chat_template"),
      padding_side="left",  # rollouts are left-padded so every row's last prompt token is aligned
      clean_up_tokenization_spaces=False)


def load_hf_tokenizer(directory: str | os.PathLike) -> transformers.PreTrainedTokenizerBase:
  """AutoTokenizer from a local HF directory, left padding, a pad token guaranteed."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), padding_side="left")
  if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
  return tokenizer
