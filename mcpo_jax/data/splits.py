"""Which split a problem belongs to, decided by its content alone.

A problem's key is its question text, normalised (case and runs of whitespace do not count); a hash
of the key is a number in [0, 1), and the split shares cut [0, 1) into train / validation / test.
So the same question lands in the same split whichever generator seed, file or position it comes
from, and two splits can never share a question, even for generators with a few hundred problems.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from mcpo_jax.data.errors import DataError

SPLITS = ("train", "validation", "test")
DEFAULT_SHARES = (0.8, 0.1, 0.1)  # train, validation, test


def content_key(question: str) -> str:
  """The normalised question: what "the same problem" means for deduplication and splitting."""
  return " ".join(question.lower().split())


def unit_hash(text: str) -> float:
  """A number in [0, 1) fixed by `text` alone (SHA-256, so it is the same in every process and run)."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def check_shares(shares: Sequence[float], where: str) -> tuple[float, float, float]:
  shares = tuple(float(share) for share in shares)
  if len(shares) != 3 or min(shares) <= 0 or abs(sum(shares) - 1.0) > 1e-6:
    raise DataError(f"{where}.split_shares={list(shares)}; give three positive shares (train, validation, test) "
                    "that sum to 1, e.g. [0.8, 0.1, 0.1].")
  return shares


def split_of_position(position: float, shares: Sequence[float]) -> str:
  """The split that owns `position` in [0, 1): train [0, s0), validation [s0, s0 + s1), test the rest."""
  if position < shares[0]:
    return "train"
  return "validation" if position < shares[0] + shares[1] else "test"


def split_of(question: str, shares: Sequence[float] = DEFAULT_SHARES) -> str:
  return split_of_position(unit_hash(content_key(question)), shares)
