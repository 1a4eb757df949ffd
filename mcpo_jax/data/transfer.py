"""A task with known cross-domain transfer: adding two whole numbers, asked in several surface formats.

Each format is its own domain (source kind "addition"), and all formats share one skill, so what a
policy learns in one format should help in the others. An unordered operand pair {a, b} belongs to
one split, decided by a hash of the pair alone: a pair seen in training never appears in a held-out
split, in any format. Each pair is asked one way per format (operand order and story picked by a
hash of the pair), so a split holds each problem once. Held-out splits are in hash order, a fixed
shuffle: an evaluation that takes the first N prompts gets a spread of operand sizes.
"""

from __future__ import annotations

import functools
from typing import Sequence

from mcpo_jax.data.errors import DataError
from mcpo_jax.data.splits import DEFAULT_SHARES, SPLITS, split_of_position, unit_hash

FORMATS = ("digits", "words", "story")
MAX_OPERAND = 9999

ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam")
STORIES = (
    "{name} had {a} {things} and was given {b} more, so how many {things} does {name} have now?",
    "One box holds {a} {things} and another holds {b}; how many {things} are in the two boxes together?",
    "{name} collected {a} {things} in the morning and {b} in the afternoon; how many {things} did {name} "
    "collect that day?",
)
THINGS = ("stamps", "marbles", "shells", "coins", "stickers", "apples", "pebbles", "cards")


def number_words(n: int) -> str:
  """English words for 0 <= n <= 9999, e.g. 347 -> "three hundred forty-seven"."""
  if not 0 <= n <= MAX_OPERAND:
    raise ValueError(f"number_words covers 0..{MAX_OPERAND}; got {n}.")
  if n < 20:
    return ONES[n]
  if n < 100:
    return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
  big, rest = (n // 1000, "thousand") if n >= 1000 else (n // 100, "hundred")
  remainder = n % 1000 if n >= 1000 else n % 100
  return f"{number_words(big)} {rest}" + (f" {number_words(remainder)}" if remainder else "")


def pair_key(a: int, b: int) -> str:
  return f"{min(a, b)}+{max(a, b)}"


def question(format_name: str, a: int, b: int) -> str:
  """The question for a + b in `format_name`; the story wording is fixed by the pair."""
  if format_name == "digits":
    return f"What is {a} + {b}?"
  if format_name == "words":
    return f"What is {number_words(a)} plus {number_words(b)}?"
  pick = int(unit_hash("story:" + pair_key(a, b)) * 2**32)
  template = STORIES[pick % len(STORIES)]
  name, things = NAMES[(pick // 7) % len(NAMES)], THINGS[(pick // 101) % len(THINGS)]
  return template.format(name=name, things=things, a=a, b=b)


@functools.lru_cache(maxsize=16)
def split_pairs(first: tuple[int, int], second: tuple[int, int], split: str,
                shares: tuple[float, float, float]) -> tuple[tuple[int, int], ...]:
  """The operand pairs of `split`, one operand from each inclusive range, in hash order; each unordered
  pair once, its operand order fixed by the pair."""
  pairs = {}
  for x in range(first[0], first[1] + 1):
    for y in range(second[0], second[1] + 1):
      key = pair_key(x, y)
      position = unit_hash(key)
      if key not in pairs and split_of_position(position, shares) == split:
        a, b = min(x, y), max(x, y)
        pairs[key] = (position, (b, a) if unit_hash("order:" + key) < 0.5 else (a, b))
  return tuple(pair for _, pair in sorted(pairs.values()))


class AdditionSource:
  """The `split` of a + b, asked in `format_name`: a in [low, high], b in `second` (default: the same
  range); random access, each problem once."""

  skipped_rows = 0

  def __init__(self, format_name: str, low: int, high: int, split: str,
               shares: Sequence[float] = DEFAULT_SHARES, second: tuple[int, int] | None = None,
               where: str = "source"):
    second = second or (low, high)
    if format_name not in FORMATS:
      raise DataError(f"{where}.format={format_name!r}; choose one of {list(FORMATS)}.")
    for name, (lo, hi) in (("low, high", (low, high)), ("second_low, second_high", second)):
      if not 0 <= lo <= hi <= MAX_OPERAND:
        raise DataError(f"{where}: {name} = {lo}, {hi}; use 0 <= low <= high <= {MAX_OPERAND}.")
    if split not in SPLITS:
      raise DataError(f"split {split!r} is not one of {list(SPLITS)}.")
    self.format_name = format_name
    self.pairs = split_pairs((low, high), tuple(second), split, tuple(shares))
    if not self.pairs:
      raise DataError(f"{where}: no operand pairs fall in the {split} split; widen low..high.")

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    a, b = self.pairs[index]
    return {"prompt": question(self.format_name, a, b), "answer": str(a + b), "metadata": {"a": a, "b": b}}


INSTRUCTION = "Give only the final answer between <answer> and </answer>."


def transfer_domains(low: int = 10, high: int = 199, second: tuple[int, int] = (1, 9),
                     shares: Sequence[float] = (0.6, 0.2, 0.2)) -> dict[str, dict]:
  """Addition of a number in [low, high] and one in `second`, as digits, as words, and as a one-sentence
  story: three domains, one skill. Sums span 11..208 (no constant answer is right on more than 3%
  of a 150-prompt eval set); the splits hold 1028 / 322 / 360 operand pairs.

  Measured with the embedded SmolLM2-135M-Instruct on validation, 64 prompts x 4 samples at temperature
  1, 48 new tokens (`python -m mcpo_jax.data.base_accuracy --config=configs/multi_domain.py:transfer`):
  sampled accuracy digits 13.7% / words 0.4% / story 0.8%, groups with variance 48% / 2% / 3%, greedy
  3.1% / 9.4% / 1.6%; constant answer 3.1% on these 64. Below the 15-60% aimed for except digits:
  words and story give GRPO almost no signal at this size. Probes on 24-32 prompts: a worked example in
  the prompt dropped digits to ~1%; no instruction or "Answer with the number only" did no better.
  Easier variants did not reach the band either (validation, sampled digits / words / story, 48-64
  prompts x 4, so about ±4 points): a in [10, 99] at T = 1 (64 new tokens) 12.1 / 2.0 / 1.6%, at
  T = 0.7 9.0 / 3.9 / 3.5%; a in [10, 49] at T = 1 13.0 / 1.0 / 1.0%, at T = 0.7 17.2 / 3.1 / 6.8%
  (and its 72 test pairs are too few for a 150-prompt eval); "a plus b", "a plus <b in words>" and a
  short coin story at T = 1 8.2 / 5.1 / 2.3%. At T = 1 the 135M model mostly rambles off the problem.
  """
  def domain(format_name: str) -> dict:
    return {"source": {"kind": "addition", "format": format_name, "low": low, "high": high,
                       "second_low": second[0], "second_high": second[1], "split_shares": list(shares)},
            "verifier": "math", "weight": 1.0,
            "instruction": INSTRUCTION}
  return {f"add_{format_name}": domain(format_name) for format_name in FORMATS}
