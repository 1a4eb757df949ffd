#!/usr/bin/env python
"""Reward scoring throughput: 1,000 mixed-domain completions (math, choice, gym, code), half right.

Scores each verifier's 250 completions alone, then all 1,000 shuffled together, with one RewardPool
of `--processes` workers (default: every CPU), after a warm-up batch that loads math-verify and
reasoning-gym in every worker. Code completions each start a sandboxed Python process, which is what
bounds the mix.

First, in this process and on the same code rows, alternating: the cost of one code verification with
the bubblewrap sandbox and with sandbox="unsafe" (rlimits + audit hook, no namespaces: the path before
bubblewrap, less its `unshare --net`), and what creating the namespaces costs (`python -c pass` bare,
under `unshare --user --map-root-user --net` as before, and under bwrap).

  python benchmarks/rewards.py [--processes=8] [--per_verifier=250] [--code_rows=100]

The last line is `RESULT completions_per_s=<x>` for the mixed batch.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcpo_jax import rewards  # noqa: E402
from mcpo_jax.data import open_source  # noqa: E402
from mcpo_jax.rewards import code, sandbox  # noqa: E402


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


def code_cost(rows: list[tuple[str, dict]]) -> None:
  """Milliseconds per code verification, bwrap vs unsafe, alternating row by row (timings are noisy)."""
  seconds = {"bwrap": [], "unsafe": []}
  for completion, example in rows:
    for mode in seconds:
      sandbox.set_mode(mode)
      started = time.perf_counter()
      code.score(completion, example)
      seconds[mode].append(time.perf_counter() - started)
  sandbox.set_mode("bwrap")
  median = {mode: 1e3 * statistics.median(values) for mode, values in seconds.items()}
  print(f"code verification, median of {len(rows)}: bwrap {median['bwrap']:.1f} ms, unsafe {median['unsafe']:.1f} ms "
        f"(ratio {median['bwrap'] / median['unsafe']:.2f})")
  interpreter = [sandbox._interpreter(), "-I", "-S", "-c", "pass"]
  read, write = os.pipe()
  prefixes = {"bare": [], "unshare --user --net": ["unshare", "--user", "--map-root-user", "--net"],
              "bwrap": sandbox.bwrap_command(write)}
  starts = {name: [] for name in prefixes}
  for _ in range(len(rows)):
    for name, prefix in prefixes.items():
      started = time.perf_counter()
      subprocess.run([*prefix, *interpreter], check=True, pass_fds=(write,), stdout=subprocess.DEVNULL)
      starts[name].append(time.perf_counter() - started)
  os.close(read)
  os.close(write)
  bare = statistics.median(starts["bare"])
  extra = [f"{name} +{1e3 * (statistics.median(values) - bare):.1f} ms" for name, values in starts.items()
           if name != "bare"]
  print(f"namespace creation (median `python -c pass` minus bare {1e3 * bare:.1f} ms): {', '.join(extra)}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=os.cpu_count())
  parser.add_argument("--per_verifier", type=int, default=250)
  parser.add_argument("--code_rows", type=int, default=100)
  args = parser.parse_args()
  rng = random.Random(0)
  makers = {"math": math_rows, "choice": choice_rows, "gym": gym_rows, "code": code_rows}
  batches = {name: list(make(rng, args.per_verifier)) for name, make in makers.items()}
  sandbox.require()
  code_cost(list(code_rows(random.Random(1), args.code_rows)))
  print(f"{args.processes} worker processes; code sandbox: bwrap")
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
