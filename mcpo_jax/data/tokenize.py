"""Prompt text and tokens: the domain's template rendered with the model's chat template, left-padded."""

from __future__ import annotations

import string
from typing import Sequence

import numpy as np

from mcpo_jax.data.domains import Domain


def render_messages(domain: Domain, example: dict) -> list[dict[str, str]]:
  """Chat messages: [system prompt,] user = question + lettered choices + answer-format instruction."""
  parts = [example["prompt"].strip()]
  if example.get("choices"):
    parts.append("\n".join(f"{letter}. {text}" for letter, text in zip(string.ascii_uppercase, example["choices"])))
  parts.append(domain.prompt_instruction)
  messages = [{"role": "system", "content": domain.system_prompt}] if domain.system_prompt else []
  return messages + [{"role": "user", "content": "\n\n".join(parts)}]


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
  """Token ids of the chat-templated conversation, ending with the assistant turn's opening."""
  return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(prompt_tokens, prompt_mask), each [B, P] int32 with P the longest row: padding on the left, so the
  last prompt token of every row is aligned where generation starts."""
  length = max(len(row) for row in rows)
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for index, row in enumerate(rows):
    if row:
      ids[index, length - len(row):] = row
      mask[index, length - len(row):] = 1
  return ids, mask
