"""Verifiers by name. Each is `score(completion: str, example: dict) -> float` (1.0 right, 0.0 wrong).

Modules are imported on first use: math-verify and reasoning-gym are heavy, and a process that never
scores a math completion should not pay for them.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

Verifier = Callable[[str, dict], float]

VERIFIERS = {
    "math": "mcpo_jax.rewards.maths",
    "choice": "mcpo_jax.rewards.choice",
    "exact": "mcpo_jax.rewards.exact",
    "gym": "mcpo_jax.rewards.gym",
    "code": "mcpo_jax.rewards.code",
}


class UnknownVerifierError(ValueError):
  pass


def check_name(name: str) -> str:
  """Returns `name` if it is a verifier, else raises an error that lists the known ones."""
  if name not in VERIFIERS:
    close = difflib.get_close_matches(str(name), VERIFIERS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownVerifierError(f"unknown verifier {name!r}{hint}; known verifiers: {', '.join(VERIFIERS)}.")
  return name


def get(name: str) -> Verifier:
  """The verifier registered as `name`."""
  return importlib.import_module(VERIFIERS[check_name(name)]).score


def score_one(verifier_name: str, completion: str, example: dict) -> tuple[float, str | None]:
  """(score, None), or (0.0, error message) if the verifier raised."""
  try:
    return float(get(verifier_name)(completion, example)), None
  except Exception as error:  # noqa: BLE001 - any verifier failure is a 0 reward, counted
    return 0.0, f"{verifier_name}: {type(error).__name__}: {error}"
