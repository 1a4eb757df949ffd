"""`choice` verifier: a multiple-choice letter, however the model writes it: "(B)", "B.", "answer: b",
"\\boxed{B}", "B) text", or the text of the choice itself."""

from __future__ import annotations

import re
import string

from mcpo_jax.rewards.exact import normalize
from mcpo_jax.rewards.extract import final_answer

ONLY_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")
PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")
LETTER_THEN_TEXT = re.compile(r"([A-Z])[.):]\s")


def chosen_letter(answer: str, choices: list[str]) -> str | None:
  """The upper-case letter an extracted answer names, or None if it names none or an invalid one."""
  answer = answer.strip()
  match = (ONLY_LETTER.fullmatch(answer) or PAREN_LETTER.match(answer) or LETTER_THEN_TEXT.match(answer))
  if match:
    letter = match.group(1).upper()
  else:
    texts = [normalize(choice) for choice in choices]
    letter = string.ascii_uppercase[texts.index(normalize(answer))] if normalize(answer) in texts else None
  valid = string.ascii_uppercase[:len(choices)] if choices else string.ascii_uppercase
  return letter if letter is not None and letter in valid else None


def score(completion: str, example: dict) -> float:
  """1.0 if the chosen letter is `example["answer"]` (one letter; `example["choices"]` bounds it)."""
  answer = final_answer(completion)
  if answer is None:
    return 0.0
  return float(chosen_letter(answer, example.get("choices") or []) == example["answer"].strip().upper())
