"""Verifiers (one file each: maths, choice, exact, gym, code), the code sandbox, and parallel batch scoring.

    from mcpo_jax import rewards
    rewards.get("math")(completion, example)                      # -> 1.0 or 0.0
    with rewards.RewardPool(processes=8, format_weight=0.1, sandbox="bwrap") as pool:
      result = pool.score(completions, examples, verifier_names)  # result.rewards [N] float32
"""

from mcpo_jax.rewards.formats import FORMATS, format_score, get_format
from mcpo_jax.rewards.pool import RewardPool, ScoreResult, score_batch
from mcpo_jax.rewards.registry import VERIFIERS, UnknownVerifierError, Verifier, check_name, get
from mcpo_jax.rewards.sandbox import SandboxUnavailable

__all__ = ["FORMATS", "VERIFIERS", "RewardPool", "SandboxUnavailable", "ScoreResult", "UnknownVerifierError", "Verifier", "check_name",
           "format_score", "get", "get_format", "score_batch"]
