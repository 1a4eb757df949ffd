"""Scoring a batch of completions in parallel worker processes.

Workers are spawned (never forked from a process that runs JAX) and call verifiers in their main
thread, where math-verify's signal-based timeouts are legal. A verifier that raises scores 0 and is
counted; a batch that overruns its deadline has its unfinished rows scored 0 and counted, and the
pool is replaced, so scoring never stops training.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mcpo_jax.rewards.formats import format_score
from mcpo_jax.rewards.registry import check_name, get


@dataclass(frozen=True)
class ScoreResult:
  rewards: np.ndarray          # [N] float32: verifier score + format_weight * format score
  correct: np.ndarray          # [N] bool: the verifier said right (score >= 1)
  accuracy: dict[str, float]   # domain (or verifier, for examples without "domain") -> mean of correct
  errors: int                  # verifier exceptions and rows unfinished at the deadline
  first_error: str | None      # one message, to log


def score_one(verifier_name: str, completion: str, example: dict) -> tuple[float, str | None]:
  """(score, None), or (0.0, error message) if the verifier raised."""
  try:
    return float(get(verifier_name)(completion, example)), None
  except Exception as error:  # noqa: BLE001 - any verifier failure is a 0 reward, counted
    return 0.0, f"{verifier_name}: {type(error).__name__}: {error}"


def _ignore_interrupts() -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle


class RewardPool:
  """A pool of `processes` scoring workers; `processes=0` scores inline in this process (debugging)."""

  def __init__(self, processes: int, *, timeout_s: float = 300.0, format_weight: float = 0.0):
    if processes < 0:
      raise ValueError(f"processes={processes}; use 0 (inline) or a positive number of worker processes.")
    if format_weight < 0 or timeout_s <= 0:
      raise ValueError(f"format_weight={format_weight}, timeout_s={timeout_s}; use format_weight >= 0 and "
                       "timeout_s > 0.")
    self.processes, self.timeout_s, self.format_weight = processes, timeout_s, format_weight
    self._pool = self._start() if processes else None

  def _start(self):
    return multiprocessing.get_context("spawn").Pool(self.processes, initializer=_ignore_interrupts)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()
      self._pool = None

  def __enter__(self) -> "RewardPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _scores(self, tasks: list[tuple[str, str, dict]]) -> list[tuple[float, str | None]]:
    if self._pool is None:
      return [score_one(*task) for task in tasks]
    pending = [self._pool.apply_async(score_one, task) for task in tasks]
    deadline, results, overran = time.monotonic() + self.timeout_s, [], False
    for job in pending:
      try:
        results.append(job.get(timeout=max(0.0, deadline - time.monotonic())))
      except multiprocessing.TimeoutError:
        results.append((0.0, f"scoring deadline of {self.timeout_s}s passed"))
        overran = True
    if overran:  # a stuck worker would stall every later batch: start afresh
      self.close()
      self._pool = self._start()
    return results

  def score(self, completions: Sequence[str], examples: Sequence[dict],
            verifier_names: Sequence[str]) -> ScoreResult:
    """Scores row i of `completions` [N] with `verifier_names[i]` against `examples[i]`."""
    if not len(completions) == len(examples) == len(verifier_names):
      raise ValueError(f"score: {len(completions)} completions, {len(examples)} examples and "
                       f"{len(verifier_names)} verifier names; give one of each per row (repeat the "
                       "examples G times for G rollouts per prompt).")
    for name in set(verifier_names):
      check_name(name)
    results = self._scores(list(zip(verifier_names, completions, examples)))
    scores = np.array([value for value, _ in results], np.float32)
    messages = [message for _, message in results if message is not None]
    formats = np.zeros_like(scores)
    if self.format_weight:
      formats = np.array([format_score(text, example["answer_format"])
                          for text, example in zip(completions, examples)], np.float32)
    correct = scores >= 1.0
    groups = [example.get("domain", name) for example, name in zip(examples, verifier_names)]
    accuracy = {group: float(correct[[g == group for g in groups]].mean()) for group in dict.fromkeys(groups)}
    return ScoreResult(scores + self.format_weight * formats, correct, accuracy, len(messages),
                       messages[0] if messages else None)


def score_batch(completions: Sequence[str], examples: Sequence[dict], verifier_names: Sequence[str], *,
                processes: int, format_weight: float = 0.0) -> ScoreResult:
  """One-off scoring with a fresh pool; a training loop keeps one RewardPool open instead."""
  with RewardPool(processes, format_weight=format_weight) as pool:
    return pool.score(completions, examples, verifier_names)
