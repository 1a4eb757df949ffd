"""`exact` verifier: normalised string match (case, spacing, surrounding quotes / `$` / `\\text{}`, a
trailing period), for short answers without math structure such as names or yes/no."""

from __future__ import annotations

import re

from mcpo_jax.rewards.extract import final_answer

TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm)\{(.*)\}$", re.DOTALL)


def normalize(text: str) -> str:
  text = text.strip().strip("$").strip()
  unwrapped = TEXT_WRAPPER.match(text)
  text = unwrapped.group(1) if unwrapped else text
  text = text.strip().strip("\"'`").rstrip(".").strip()
  return " ".join(text.lower().split())


def score(completion: str, example: dict) -> float:
  """1.0 if the final answer matches `example["answer"]` (a string, or a list of accepted strings)."""
  answer = final_answer(completion)
  accepted = example["answer"] if isinstance(example["answer"], list) else [example["answer"]]
  return float(answer is not None and normalize(answer) in {normalize(a) for a in accepted})
