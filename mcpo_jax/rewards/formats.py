"""Answer formats: the instruction a domain appends to its prompts, and the strict check behind the
optional format reward. One table, so the prompt and the reward can never disagree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mcpo_jax.rewards.extract import last_boxed, last_code_block, last_tagged


@dataclass(frozen=True)
class AnswerFormat:
  instruction: str
  present: Callable[[str], bool]  # does the completion use this format (non-empty)?


FORMATS: dict[str, AnswerFormat] = {
    "answer_tag": AnswerFormat(
        "Think briefly, then give only the final answer between <answer> and </answer>.",
        lambda text: bool(last_tagged(text))),
    "boxed": AnswerFormat(
        "Reason step by step, and put your final answer within \\boxed{}.",
        lambda text: bool(last_boxed(text))),
    "code_block": AnswerFormat(
        "Write your solution as complete Python 3 code in one ```python code block.",
        lambda text: bool((last_code_block(text) or "").strip())),
}


def get_format(name: str) -> AnswerFormat:
  if name not in FORMATS:
    raise ValueError(f"unknown answer_format {name!r}; known formats: {', '.join(FORMATS)}.")
  return FORMATS[name]


def format_score(completion: str, answer_format: str) -> float:
  """1.0 if the completion uses the domain's answer format, else 0.0."""
  return float(get_format(answer_format).present(completion))
