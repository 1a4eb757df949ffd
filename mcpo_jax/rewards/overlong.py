"""DAPO's overlong reward shaping (arXiv 2503.14476 §3.4): a linear length penalty near the token budget.

With L = max_new_tokens and a buffer of B tokens, a response of |y| tokens gets
  0                      if |y| ≤ L − B,
  (L − B − |y|) / B      if L − B < |y| ≤ L   (from 0 down to −1 at the budget),
times `factor`, added to its verifier reward. A truncated response has |y| = L and so the full −factor.
The `correct` flag is untouched: the penalty shapes the advantages, not what counts as right.
"""

from __future__ import annotations

import numpy as np


def overlong_penalty(lengths: np.ndarray, max_new_tokens: int, buffer: int, factor: float = 1.0) -> np.ndarray:
  """[N] response lengths (tokens) -> [N] float32 penalties in [−factor, 0]; buffer 0 turns it off."""
  if buffer <= 0:
    return np.zeros(np.shape(lengths), np.float32)
  over = np.asarray(lengths, np.float64) - (max_new_tokens - buffer)  # tokens into the buffer
  return (-factor * np.clip(over / buffer, 0.0, 1.0)).astype(np.float32)
