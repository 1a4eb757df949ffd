#!/usr/bin/env python
"""Reward scoring throughput: 1,000 mixed-domain completions (math, choice, gym, code), half right.

Scores each verifier's 250 completions alone, then all 1,000 shuffled together, with one RewardPool
of `--processes` workers (default: every CPU), after a warm-up batch that loads math-verify and
reasoning-gym in every worker. Code completions each start a sandboxed Python process, which is what
bounds the mix.

  python benchmarks/rewards.py [--processes=8] [--per_verifier=250]

The last line is `RESULT completions_per_s=<x>` for the mixed batch.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcpo_jax import rewards  # noqa: E402
from mcpo_jax.data import open_source  # noqa: E402
from mcpo_jax.rewards.sandbox import network_isolation  # noqa: E402


def math_rows(rng: random.Random, count: int):
  for index in range(count):
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    right = f"\\frac{{{a}}}{{{b}}}" if index % 4 else f"{a / b:.6f}"
    answer = right if index % 2 else f"\\frac{{{a + 1}}}{{{b}}}"
    yield (f"We divide {a} by {b}. Simplifying carefully, the result is \\boxed{{{answer}}}.",
           {"answer": f"\\frac{{{a}}}{{{b}}}"})


def choice_rows(rng: random.Random, count: int):
  for index in range(count):
    letter = rng.choice("ABCD")
    given = letter if index % 2 else "ABCD"[("ABCD".index(letter) + 1) % 4]
    yield (f"Considering each option... the answer is ({given}).",
           {"answer": letter, "choices": ["one", "two", "three", "four"]})


def gym_rows(rng: random.Random, count: int):
  source = open_source({"kind": "reasoning_gym", "dataset": "basic_arithmetic",
                        "config": {"min_terms": 2, "max_terms": 3}}, "validation", "arithmetic")
  for index in range(count):
    example = source[index]
    answer = example["answer"] if index % 2 else example["answer"] + "1"
    yield f"Step by step... <answer>{answer}</answer>", example


def code_rows(rng: random.Random, count: int):
  for index in range(count):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    body = "return a + b" if index % 2 else "return a - b"
    if index % 3:
      yield (f"```python\ndef add(a, b):\n    {body}\n```",
             {"tests": f"assert add({a}, {b}) == {a + b}\nassert add(1, 2) == 3"})
    else:
      program = "a, b = map(int, input().split())\nprint(a + b)" if index % 2 else "print(0)"
      yield f"```python\n{program}\n```", {"tests": {"inputs": [f"{a} {b}\n"], "outputs": [f"{a + b}\n"]}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=os.cpu_count())
  parser.add_argument("--per_verifier", type=int, default=250)
  args = parser.parse_args()
  rng = random.Random(0)
  makers = {"math": math_rows, "choice": choice_rows, "gym": gym_rows, "code": code_rows}
  batches = {name: list(make(rng, args.per_verifier)) for name, make in makers.items()}
  print(f"{args.processes} worker processes; sandbox network isolation: "
        f"{' '.join(network_isolation()) or 'audit hook only'}")
  with rewards.RewardPool(args.processes) as pool:
    warm = [row for rows in batches.values() for row in rows[:2 * args.processes]]
    warm_names = [name for name, rows in batches.items() for _ in rows[:2 * args.processes]]
    pool.score([c for c, _ in warm], [e for _, e in warm], warm_names)
    for name, rows in batches.items():
      started = time.perf_counter()
      result = pool.score([c for c, _ in rows], [e for _, e in rows], [name] * len(rows))
      seconds = time.perf_counter() - started
      print(f"{name:>7}: {len(rows) / seconds:8.1f} completions/s  accuracy {result.correct.mean():.2f} "
            f"(expected 0.50)  errors {result.errors}")
    mixed = [(name, row) for name, rows in batches.items() for row in rows]
    rng.shuffle(mixed)
    started = time.perf_counter()
    result = pool.score([c for _, (c, _) in mixed], [e for _, (_, e) in mixed], [name for name, _ in mixed])
    seconds = time.perf_counter() - started
  print(f"  mixed: {len(mixed)} completions in {seconds:.2f} s, accuracy {result.correct.mean():.2f}, "
        f"errors {result.errors}")
  print(f"RESULT completions_per_s={len(mixed) / seconds:.1f}")


if __name__ == "__main__":
  main()
