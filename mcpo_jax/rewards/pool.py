"""Scoring a batch of completions in parallel worker processes.

Workers are fresh interpreters (never forked from a process that runs JAX), one pair of pipes each,
and call verifiers in their main thread, where math-verify's signal-based timeouts are legal. They
ignore SIGINT and SIGTERM (see worker.py) and share nothing, no queue and no lock, so killing one never
blocks another or this process. A verifier that raises scores 0 and is counted; a worker that dies
mid-task is replaced and its row retried once, then scored 0 and counted; a batch that overruns its deadline has its
unfinished rows scored 0 and counted, and its busy workers killed and replaced, so scoring never stops
training. `close()` asks the workers to exit, kills what remains after a deadline, and reaps them all.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Sequence

import numpy as np

from mcpo_jax.rewards import sandbox as code_sandbox
from mcpo_jax.rewards.formats import format_score
from mcpo_jax.rewards.registry import check_name, score_one
from mcpo_jax.rewards.worker import BOOTSTRAP

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_warned_unsafe = False


@dataclass(frozen=True)
class ScoreResult:
  rewards: np.ndarray          # [N] float32: verifier score + format_weight * format score
  correct: np.ndarray          # [N] bool: the verifier said right (score >= 1)
  accuracy: dict[str, float]   # domain (or verifier, for examples without "domain") -> mean of correct
  errors: int                  # verifier exceptions and rows unfinished at the deadline
  first_error: str | None      # one message, to log
  untrusted_tests: int = 0     # code rows whose tests ran inside the candidate's process (code.harness)


class _Worker:
  """One worker process and its two pipes."""

  def __init__(self, mode: str):
    task_read, self._task_write = os.pipe()
    self._answer_read, answer_write = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
    self.process = subprocess.Popen(
        [sys.executable, "-c", BOOTSTRAP, str(task_read), str(answer_write), mode, str(os.getpid())],
        pass_fds=(task_read, answer_write), env=env, stdin=subprocess.DEVNULL)
    os.close(task_read)
    os.close(answer_write)
    self.tasks = Connection(self._task_write, readable=False)
    self.answers = Connection(self._answer_read, writable=False)
    self.exited = os.pidfd_open(self.process.pid)

  def close(self) -> None:
    if not self.tasks.closed:
      self.tasks.close()
      self.answers.close()
      os.close(self.exited)


def _stop(workers: list[_Worker], timeout_s: float) -> None:
  """Asks each worker to exit, SIGKILLs those still running after `timeout_s`, and reaps them all."""
  for worker in workers:
    try:
      worker.tasks.send(None)
    except OSError:
      pass
  deadline = time.monotonic() + timeout_s
  for worker in workers:
    try:
      worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      worker.process.kill()
      worker.process.wait()
    worker.close()
  workers.clear()


class RewardPool:
  """A pool of `processes` scoring workers; `processes=0` scores inline in this process (debugging).

  `sandbox` is the code sandbox's mode (sandbox.MODES): "bwrap" refuses to verify code without kernel
  isolation; "unsafe" runs it with rlimits and the audit hook only, and says so once per process.
  """

  def __init__(self, processes: int, *, timeout_s: float = 300.0, format_weight: float = 0.0,
               sandbox: str = "bwrap", close_timeout_s: float = 5.0):
    if processes < 0:
      raise ValueError(f"processes={processes}; use 0 (inline) or a positive number of worker processes.")
    if format_weight < 0 or timeout_s <= 0:
      raise ValueError(f"format_weight={format_weight}, timeout_s={timeout_s}; use format_weight >= 0 and "
                       "timeout_s > 0.")
    code_sandbox.set_mode(sandbox)
    if sandbox == "unsafe":
      _warn_unsafe()
    self.processes, self.timeout_s, self.format_weight = processes, timeout_s, format_weight
    self.sandbox, self.close_timeout_s = sandbox, close_timeout_s
    self._workers: list[_Worker] = []
    self._finalizer = weakref.finalize(self, _stop, self._workers, close_timeout_s)  # also at interpreter exit
    self._fill()

  def _fill(self) -> None:
    """Replaces workers that died, up to `processes`."""
    for worker in [w for w in self._workers if w.process.poll() is not None]:
      self._workers.remove(worker)
      worker.process.wait()
      worker.close()
    while len(self._workers) < self.processes:
      self._workers.append(_Worker(self.sandbox))

  def _kill(self, worker: _Worker) -> None:
    worker.process.kill()
    worker.process.wait()
    worker.close()
    self._workers.remove(worker)

  def close(self) -> None:
    """Idempotent; bounded by `close_timeout_s` (then SIGKILL)."""
    self._finalizer()

  def __enter__(self) -> "RewardPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _scores(self, tasks: list[tuple[str, str, dict]]) -> list[tuple[float, str | None]]:
    if not self.processes:
      return [score_one(*task) for task in tasks]
    self._fill()
    results: list[tuple[float, str | None] | None] = [None] * len(tasks)
    queue = collections.deque(enumerate(tasks))
    busy: dict[_Worker, int] = {}
    deaths = collections.Counter()  # per row: workers that died holding it
    deadline = time.monotonic() + self.timeout_s
    while queue or busy:
      for worker in [w for w in self._workers if w not in busy]:
        if not queue:
          break
        index, task = queue.popleft()
        try:
          worker.tasks.send((index, *task))
          busy[worker] = index
        except OSError:  # it died idle: retry the task on a fresh worker
          queue.appendleft((index, task))
          self._kill(worker)
          self._workers.append(_Worker(self.sandbox))
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      ready = set(wait([h for w in busy for h in (w.answers, w.exited)], timeout=remaining))
      for worker in [w for w in busy if w.answers in ready or w.exited in ready]:
        try:
          index, value = worker.answers.recv()
          results[index] = value
          del busy[worker]
        except (EOFError, OSError):  # the worker died: killed from outside, or the row's verifier crashed it
          index = busy.pop(worker)
          deaths[index] += 1
          if deaths[index] < 2:
            queue.appendleft((index, tasks[index]))
          else:
            results[index] = (0.0, f"{tasks[index][0]}: the scoring worker died twice on this row "
                                   f"(exit code {worker.process.wait()})")
          self._kill(worker)
          self._workers.append(_Worker(self.sandbox))
    for worker in list(busy):  # a stuck worker would stall every later batch: replace it
      self._kill(worker)
    return [value if value is not None else (0.0, f"scoring deadline of {self.timeout_s}s passed")
            for value in results]

  def score(self, completions: Sequence[str], examples: Sequence[dict],
            verifier_names: Sequence[str]) -> ScoreResult:
    """Scores row i of `completions` [N] with `verifier_names[i]` against `examples[i]`."""
    if not len(completions) == len(examples) == len(verifier_names):
      raise ValueError(f"score: {len(completions)} completions, {len(examples)} examples and "
                       f"{len(verifier_names)} verifier names; give one of each per row (repeat the "
                       "examples G times for G rollouts per prompt).")
    for name in set(verifier_names):
      check_name(name)
    untrusted = 0
    if "code" in verifier_names:
      code_sandbox.require()  # one clear error here, not a silent 0 from every worker
      from mcpo_jax.rewards.code import harness
      untrusted = sum(harness(e) == "script" for e, n in zip(examples, verifier_names) if n == "code")
    results = self._scores(list(zip(verifier_names, completions, examples)))
    scores = np.array([value for value, _ in results], np.float32)
    messages = [message for _, message in results if message is not None]
    formats = np.zeros_like(scores)
    if self.format_weight:
      formats = np.array([format_score(text, example["answer_format"])
                          for text, example in zip(completions, examples)], np.float32)
    correct = scores >= 1.0
    return ScoreResult(scores + self.format_weight * formats, correct, domain_accuracy(correct, examples, verifier_names),
                       len(messages), messages[0] if messages else None, untrusted)


def domain_accuracy(correct: np.ndarray, examples: Sequence[dict], verifier_names: Sequence[str]) -> dict[str, float]:
  """{domain (or verifier, for examples without "domain"): the mean of `correct` [N] over its rows}."""
  groups = [example.get("domain", name) for example, name in zip(examples, verifier_names)]
  return {group: float(correct[[g == group for g in groups]].mean()) for group in dict.fromkeys(groups)}


def _warn_unsafe() -> None:
  global _warned_unsafe
  if not _warned_unsafe:
    _warned_unsafe = True
    print("WARNING: rewards.sandbox='unsafe': model-written code runs without kernel isolation (rlimits and an "
          "audit hook only); a determined program can reach this machine's files and processes.", file=sys.stderr)


def score_batch(completions: Sequence[str], examples: Sequence[dict], verifier_names: Sequence[str], *,
                processes: int, format_weight: float = 0.0, sandbox: str = "bwrap") -> ScoreResult:
  """One-off scoring with a fresh pool; a training loop keeps one RewardPool open instead."""
  with RewardPool(processes, format_weight=format_weight, sandbox=sandbox) as pool:
    return pool.score(completions, examples, verifier_names)
