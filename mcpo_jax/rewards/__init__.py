"""Verifiers (one file each: maths, choice, exact, gym, code), the code sandbox, and parallel batch scoring.

    from mcpo_jax import rewards
    rewards.get("math")(completion, example)                      # -> 1.0 or 0.0
    with rewards.RewardPool(processes=8, format_weight=0.1, sandbox="bwrap") as pool:
      result = pool.score(completions, examples, verifier_names)  # result.rewards [N] float32

Names are imported on first use, so a reward worker (which imports this package) starts without numpy.
"""

import importlib

_HOMES = {
    "FORMATS": "formats", "format_score": "formats", "get_format": "formats",
    "RewardPool": "pool", "ScoreResult": "pool", "score_batch": "pool",
    "VERIFIERS": "registry", "UnknownVerifierError": "registry", "Verifier": "registry", "check_name": "registry",
    "get": "registry", "score_one": "registry",
    "SandboxUnavailable": "sandbox", "score_held_rows": "held_rows",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
  if name not in _HOMES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
