"""Which domains fill each batch, and in which order each domain's examples are visited.

Stratified by weight with carried remainders: batch k gives domain d about B·w_d rows, rounded so that
the running total stays within one row of k·B·w_d; so the ratio is exact over many batches, not just
in expectation. Every domain of positive weight gets at least one row per batch (so B ≥ their
number), so a small domain appears every step; that floor wins over the ratio when B·w_d < 1. A
domain of weight 0 (evaluated only) gets none.

Each domain's examples are visited in a fresh permutation per epoch, a pure function of
(seed, domain name, epoch), so a position in the stream is all the state a resume needs.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np


def batch_counts(weights: np.ndarray, batch_size: int, emitted: np.ndarray, batches_done: int) -> np.ndarray:
  """Rows per domain [D] int64 for the next batch.

  weights: [D] non-negative, summing to 1. emitted: [D] rows given so far over `batches_done` batches.
  """
  domains = len(weights)
  trained = weights > 0  # [D]
  if batch_size < trained.sum():
    raise ValueError(f"batch_size={batch_size} is below the {trained.sum()} trained domains; every batch holds "
                     "every domain of positive weight.")
  counts = trained.astype(np.int64)
  owed = np.maximum((batches_done + 1) * batch_size * weights - emitted - counts, 0.0)  # [D]
  if owed.sum() <= 0:
    owed = weights.astype(np.float64)
  share = (batch_size - counts.sum()) * owed / owed.sum()
  whole = np.floor(share).astype(np.int64)
  remainder = batch_size - counts.sum() - whole.sum()
  order = np.lexsort((np.arange(domains), -(share - whole)))  # largest fraction first, ties by domain id
  whole[order[:remainder]] += 1
  return counts + whole


@functools.lru_cache(maxsize=32)
def _permutation(seed: int, domain: str, length: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, zlib.crc32(domain.encode()), epoch]).permutation(length)


def example_index(seed: int, domain: str, length: int, position: int) -> int:
  """The index of the `position`-th example visited in a domain of `length` examples."""
  epoch, offset = divmod(position, length)
  return int(_permutation(seed, domain, length, epoch)[offset])
