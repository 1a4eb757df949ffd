"""`code` verifier: the completion's last ```python block (else the whole completion) must pass the
example's tests, run in the sandbox. Score 1.0 only if every case passes.

`example["tests"]` takes the shapes of the usual public sets:
- a string of Python asserts (MBPP / HumanEval; with `example["entry_point"]`, HumanEval's
  `check(<entry_point>)` is called after the tests are defined);
- {"inputs": [...], "outputs": [...]}: stdin/stdout cases (APPS / TACO / CodeContests). The program runs
  once per case; its stdout must equal the expected output up to trailing whitespace;
- the same with "fn_name": call-based cases (TACO / LeetCode): `fn(*inputs[i])` must equal `outputs[i]`
  (or `[outputs]`, as TACO wraps them). A driver prints each result as JSON and this process compares,
  so a candidate cannot fake equality from inside (an object whose `__eq__` always says True).
Assert strings are checked inside the candidate's process, where such tricks remain possible.
"""

from __future__ import annotations

import json
import math

from mcpo_jax.rewards.extract import last_code_block
from mcpo_jax.rewards.sandbox import Limits, run_python

RESULT_PREFIX = "@@mcpo-result "
CALL_DRIVER = f"""
import json as _json, sys as _sys
_name = {{name!r}}
_fn = getattr(Solution(), _name) if "Solution" in globals() else globals()[_name]
for _line in _sys.stdin:
    print({RESULT_PREFIX!r} + _json.dumps(_fn(*_json.loads(_line))), flush=True)
"""


def _text(value) -> str:
  return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _same_output(actual: str, expected: str) -> bool:
  def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]
  return lines(actual) == lines(expected)


def _limits(example: dict) -> Limits:
  seconds = float(example.get("time_limit_s") or Limits.wall_s)
  return Limits(wall_s=seconds, cpu_s=math.ceil(seconds))


def _passes_io(program: str, tests: dict, limits: Limits) -> bool:
  for case_input, expected in zip(tests["inputs"], tests["outputs"], strict=True):
    result = run_python([("solution.py", program)], stdin=_text(case_input), limits=limits)
    if not (result.finished and _same_output(result.stdout, _text(expected))):
      return False
  return True


def _passes_calls(program: str, tests: dict, limits: Limits) -> bool:
  stdin = "".join(json.dumps(args if isinstance(args, list) else [args]) + "\n" for args in tests["inputs"])
  result = run_python([("solution.py", program), ("driver.py", CALL_DRIVER.format(name=tests["fn_name"]))],
                      stdin=stdin, limits=limits)
  returned = [json.loads(line[len(RESULT_PREFIX):]) for line in result.stdout.splitlines()
              if line.startswith(RESULT_PREFIX)]
  return (result.finished and len(returned) == len(tests["outputs"])
          and all(value == expected or [value] == expected for value, expected in zip(returned, tests["outputs"])))


def _passes_asserts(program: str, tests: str, entry_point: str | None, limits: Limits) -> bool:
  if entry_point:
    tests = f"{tests}\ncheck({entry_point})\n"
  return run_python([("solution.py", program), ("tests.py", tests)], limits=limits).finished


def score(completion: str, example: dict) -> float:
  """1.0 if the candidate passes every test case in `example["tests"]`."""
  program = last_code_block(completion) or completion
  tests, limits = example["tests"], _limits(example)
  if isinstance(tests, str):
    return float(_passes_asserts(program, tests, example.get("entry_point"), limits))
  if isinstance(tests, dict) and {"inputs", "outputs"} <= tests.keys():
    passes = _passes_calls if tests.get("fn_name") else _passes_io
    return float(passes(program, tests, limits))
  raise ValueError("example['tests'] must be a string of asserts or a dict with 'inputs' and 'outputs' "
                   f"(and optionally 'fn_name'); got {type(tests).__name__}")
