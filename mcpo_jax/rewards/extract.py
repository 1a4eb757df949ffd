"""Finding the final answer in a completion: the first step shared by the text verifiers.

Order: the last `<answer>…</answer>` (a `\\boxed{}` inside it is unwrapped), else the last `\\boxed{}`,
else a lenient fallback (the last "answer is …" / "answer: …" phrase, or the last non-empty line, and
of an equation "2 + 3 = 5" its right side), so that a small model that ignores the requested format
can still be right; the separate format reward (`formats.py`) is what teaches the format.
"""

from __future__ import annotations

import re

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
ANSWER_PHRASE = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*([^\n]+)", re.IGNORECASE)
CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` / `\\fbox{...}` with balanced braces; None if there is none."""
  for match in reversed(list(BOX_OPEN.finditer(text))):
    depth, start = 1, match.end()
    for position in range(start, len(text)):
      depth += {"{": 1, "}": -1}.get(text[position], 0)
      if depth == 0:
        return text[start:position].strip()
  return None


def last_tagged(text: str) -> str | None:
  """Content of the last `<answer>...</answer>` pair; None if there is none."""
  found = ANSWER_TAG.findall(text)
  return found[-1].strip() if found else None


def strict_answer(text: str) -> str | None:
  """The answer given in a requested format (answer tag or box), or None."""
  tagged = last_tagged(text)
  if tagged is not None:
    boxed = last_boxed(tagged)
    return tagged if boxed is None else boxed
  return last_boxed(text)


def fallback_answer(text: str) -> str | None:
  """The last "answer is X" / "answer: X" phrase, else the last non-empty line; of an equation its right
  side; trailing period dropped."""
  phrases = ANSWER_PHRASE.findall(text)
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  candidate = phrases[-1] if phrases else (lines[-1] if lines else "")
  candidate = candidate.rsplit("=", 1)[-1].strip().rstrip(".").strip()
  return candidate or None


def final_answer(text: str) -> str | None:
  """The answer in the requested format if present, else the lenient fallback."""
  answer = strict_answer(text)
  return answer if answer is not None else fallback_answer(text)


def last_code_block(text: str) -> str | None:
  """The last fenced code block (```python, ```py or bare ```), or None."""
  blocks = CODE_BLOCK.findall(text)
  return blocks[-1] if blocks else None
