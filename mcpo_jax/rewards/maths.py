"""`math` verifier: symbolic equivalence with math-verify (so `\\frac{1}{2}` equals 0.5 and `1/2`).

The answer in the requested format (last `<answer>` or last `\\boxed{}`; several boxes: the last wins)
is parsed alone; without one, math-verify searches the whole completion. math-verify enforces its
timeouts with signal.alarm, which Python allows only in a main thread: the reward pool calls verifiers
in its worker processes' main threads; elsewhere the timeouts are turned off rather than crash.
"""

from __future__ import annotations

import threading

from mcpo_jax.rewards.extract import strict_answer


def _timeout(seconds: int) -> int | None:
  return seconds if threading.current_thread() is threading.main_thread() else None


def score(completion: str, example: dict) -> float:
  """1.0 if the completion's final answer equals `example["answer"]` (a LaTeX or plain string)."""
  import math_verify
  from math_verify import ExprExtractionConfig, LatexExtractionConfig

  configs = [LatexExtractionConfig(), ExprExtractionConfig()]
  gold = math_verify.parse(f"${example['answer']}$", configs, parsing_timeout=_timeout(5), raise_on_error=True)
  if not gold:
    raise ValueError(f"math-verify could not parse the reference answer {example['answer']!r}")
  answer = strict_answer(completion)
  target = completion if answer is None else f"${answer}$"
  predicted = math_verify.parse(target, configs, parsing_timeout=_timeout(5))
  return float(bool(predicted) and math_verify.verify(gold, predicted, timeout_seconds=_timeout(5)))
