"""Scoring on a pod: each host verifies only the rows it holds, and every host gets the same global result.

A batch of rollouts is a global [N, ...] array whose rows are spread over the hosts. Verifying every row
on every host would repeat the sandbox work once per host, and with timeouts two hosts could give one
row different rewards and then build their shards of the batch from different advantages. Here each
row has one owner, the lowest-numbered process holding a copy of it; the owner scores it, and the
rewards are then summed across processes (every other process contributes 0 for that row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from mcpo_jax.rewards.pool import RewardPool, ScoreResult, domain_accuracy


def row_owners(devices_indices: Mapping, n: int) -> np.ndarray:
  """[N] int32: each row's owner, the lowest process index among the devices holding it.
  devices_indices: {device: index tuple} of a global [N, ...] array (Sharding.devices_indices_map)."""
  owner = np.full(n, np.iinfo(np.int32).max, np.int32)
  for device, index in devices_indices.items():
    block = index[0] if index else slice(None)
    owner[block] = np.minimum(owner[block], device.process_index)
  return owner


def owned_rows(rows: jax.Array) -> np.ndarray:
  """[N] bool: the rows of the global array `rows` [N, ...] that this process scores. Over all processes
  each row is owned exactly once; every process computes the same ownership from the sharding."""
  if rows.is_fully_addressable:
    return np.ones(rows.shape[0], bool)
  return row_owners(rows.sharding.devices_indices_map(rows.shape), rows.shape[0]) == jax.process_index()


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """The elementwise sum of each process's `x` (the same shape and dtype everywhere), on every process."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0).astype(x.dtype)


def score_held_rows(pool: RewardPool, completions: Sequence[str], examples: Sequence[dict],
                    verifier_names: Sequence[str], rows: jax.Array) -> ScoreResult:
  """pool.score over all N rows, each verified only by its owner (`owned_rows(rows)`); the rewards, verdicts,
  error and untrusted-test counts are identical on every process. first_error is this process's own."""
  if rows.is_fully_addressable:  # one process (or rows it holds alone): nothing to share
    return pool.score(completions, examples, verifier_names)
  mine = np.flatnonzero(owned_rows(rows))  # [n] this process's rows; possibly none, yet it joins the sums
  rewards = np.zeros(len(completions), np.float32)
  correct = np.zeros(len(completions), np.int32)
  counts, first_error = np.zeros(2, np.int64), None
  if len(mine):
    local = pool.score([completions[i] for i in mine], [examples[i] for i in mine],
                       [verifier_names[i] for i in mine])
    rewards[mine], correct[mine] = local.rewards, local.correct
    counts[:], first_error = (local.errors, local.untrusted_tests), local.first_error
  rewards, correct = sum_over_processes(rewards), sum_over_processes(correct).astype(bool)
  errors, untrusted = sum_over_processes(counts)
  return ScoreResult(rewards, correct, domain_accuracy(correct, examples, verifier_names), int(errors),
                     first_error, int(untrusted))
