"""`code` verifier: the completion's last ```python block (else the whole completion) must pass the
example's tests, run in the sandbox. Score 1.0 only if every case passes.

`example["tests"]` takes the shapes of the usual public sets, each checked by a harness this process
trusts, so the candidate has nothing to fool (an object whose `__eq__` always says True, an early exit,
a stolen end marker):
- a string of Python asserts (MBPP / HumanEval; with `example["entry_point"]`, HumanEval's
  `def check(candidate)` asserts are read with `candidate` standing for the entry point). Each assert of
  the form `assert f(<literals>) == <literal>` (or `!=`, `assert f(...)`, `assert not f(...)`) is parsed
  with `ast`: only the call runs in the sandbox, its value comes back as a plain repr, and the
  comparison with `ast.literal_eval(expected)` happens here. The expected values never enter the
  sandbox. Tests in any other form run as a script inside the candidate's process, as before, where such
  tricks remain possible; `harness(example) == "script"` says so and the reward pool counts them;
- {"inputs": [...], "outputs": [...]}: stdin/stdout cases (APPS / TACO / CodeContests). The program runs
  once per case; its stdout must equal the expected output up to trailing whitespace, compared here;
- the same with "fn_name": call-based cases (TACO / LeetCode): `fn(*inputs[i])` (a method of `Solution()`
  if the program defines it) must equal `outputs[i]` (or `[outputs]`, as TACO wraps them).
"""

from __future__ import annotations

import ast
import functools
import math
from dataclasses import dataclass

from mcpo_jax.rewards.extract import last_code_block
from mcpo_jax.rewards.sandbox import Limits, run_python

CHECKS = {"==": lambda value, expected: value == expected, "!=": lambda value, expected: value != expected,
          "truthy": lambda value, _: bool(value), "falsy": lambda value, _: not value}


@dataclass(frozen=True)
class Asserts:
  setup: str                              # the tests' import statements, run after the program
  calls: tuple[str, ...]                  # expressions evaluated in the sandbox
  checks: tuple[tuple[str, object], ...]  # per call: (a CHECKS key, the expected value)
  constant_ok: bool                       # every assert without a call (`assert True`) holds


def _literal(node: ast.AST):
  """(True, value) if `node` is a literal ast.literal_eval accepts, else (False, None)."""
  try:
    return True, ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return False, None


def _plain_call(node: ast.AST) -> bool:
  """A call of a named function (or method) with literal arguments: its value is the candidate's answer."""
  def named(func: ast.AST) -> bool:
    if isinstance(func, ast.Name):
      return True
    if isinstance(func, ast.Attribute):
      return named(func.value)
    return isinstance(func, ast.Call) and not func.args and not func.keywords and named(func.func)  # Solution()

  return (isinstance(node, ast.Call) and named(node.func) and all(_literal(arg)[0] for arg in node.args)
          and all(keyword.arg and _literal(keyword.value)[0] for keyword in node.keywords))


class _Rename(ast.NodeTransformer):
  def __init__(self, old: str, new: str):
    self.old, self.new = old, new

  def visit_Name(self, node: ast.Name) -> ast.Name:
    return ast.copy_location(ast.Name(self.new, node.ctx), node) if node.id == self.old else node


def _check(test: ast.AST) -> tuple[str, ast.AST | None, object] | None:
  """(check, call node or None, expected) for a supported assert test expression, else None."""
  if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Eq, ast.NotEq)):
    op = "==" if isinstance(test.ops[0], ast.Eq) else "!="
    for call, other in ((test.left, test.comparators[0]), (test.comparators[0], test.left)):
      is_literal, expected = _literal(other)
      if is_literal and _plain_call(call):
        return op, call, expected
    return None
  if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and _plain_call(test.operand):
    return "falsy", test.operand, None
  if _plain_call(test):
    return "truthy", test, None
  is_literal, value = _literal(test)
  return ("truthy", None, value) if is_literal else None


@functools.lru_cache(maxsize=4096)
def parse_asserts(tests: str, entry_point: str | None) -> Asserts | None:
  """The trusted form of assert-style `tests`, or None if any statement falls outside it."""
  try:
    module = ast.parse(tests)
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return None
  setup, calls, checks, constant_ok = [], [], [], True

  def read(statements: list[ast.stmt], rename: _Rename | None) -> bool:
    nonlocal constant_ok
    for statement in statements:
      if isinstance(statement, (ast.Import, ast.ImportFrom)):
        setup.append(ast.unparse(statement))
      elif isinstance(statement, ast.Pass) or (isinstance(statement, ast.Expr)
                                               and isinstance(statement.value, ast.Constant)):
        continue  # docstrings
      elif isinstance(statement, ast.Assign) and _literal(statement.value)[0] and rename is None:
        continue  # HumanEval's METADATA = {...}
      elif (isinstance(statement, ast.FunctionDef) and statement.name == "check" and entry_point and rename is None
            and len(statement.args.args) == 1 and not statement.decorator_list):
        if not read(statement.body, _Rename(statement.args.args[0].arg, entry_point)):
          return False
      elif isinstance(statement, ast.Assert) and (found := _check(statement.test)) is not None:
        check, call, expected = found
        if call is None:
          constant_ok = constant_ok and bool(expected)
        else:
          calls.append(ast.unparse(rename.visit(call) if rename else call))
          checks.append((check, expected))
      else:
        return False
    return True

  if not read(module.body, None):
    return None
  return Asserts("\n".join(setup), tuple(calls), tuple(checks), constant_ok)


def harness(example: dict) -> str:
  """How `example`'s tests are checked: "asserts", "calls", "io" (trusted) or "script" (inside the candidate)."""
  tests = example.get("tests")
  if isinstance(tests, str):
    return "asserts" if parse_asserts(tests, example.get("entry_point")) else "script"
  return "calls" if isinstance(tests, dict) and tests.get("fn_name") else "io"


def _returned(value: list):
  """The call's value (ok, repr) as a plain object; raises ValueError where the call failed."""
  ok, text = value
  if not ok:
    raise ValueError(text)
  return ast.literal_eval(text)


def _text(value) -> str:
  return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _same_output(actual: str, expected: str) -> bool:
  def lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]
  return lines(actual) == lines(expected)


def _lists(value):
  """Tuples as lists, as the JSON the expected outputs come from has them."""
  if isinstance(value, (list, tuple)):
    return [_lists(item) for item in value]
  if isinstance(value, dict):
    return {key: _lists(item) for key, item in value.items()}
  return value


def _limits(example: dict) -> Limits:
  seconds = float(example.get("time_limit_s") or Limits.wall_s)
  return Limits(wall_s=seconds, cpu_s=math.ceil(seconds))


def _passes_io(program: str, tests: dict, limits: Limits) -> bool:
  for case_input, expected in zip(tests["inputs"], tests["outputs"], strict=True):
    result = run_python([("solution.py", program)], stdin=_text(case_input), limits=limits)
    if not (result.finished and _same_output(result.stdout, _text(expected))):
      return False
  return True


def _matches(values: list, checks, compare) -> bool:
  try:
    return all(compare(_returned(value), check) for value, check in zip(values, checks, strict=True))
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return False


def _passes_calls(program: str, tests: dict, limits: Limits) -> bool:
  name = tests["fn_name"]
  target = f"(Solution().{name} if 'Solution' in globals() else {name})"
  calls = [f"{target}(*{args if isinstance(args, list) else [args]!r})" for args in tests["inputs"]]
  result = run_python([("solution.py", program)], calls=calls, limits=limits)

  def compare(value, expected) -> bool:
    value = _lists(value)
    return value == expected or [value] == expected

  return result.finished and _matches(result.values, tests["outputs"], compare)


def _passes_asserts(program: str, tests: str, entry_point: str | None, limits: Limits) -> bool:
  parsed = parse_asserts(tests, entry_point)
  if parsed is None:  # not a trusted form: the tests run as a script inside the candidate's process
    script = f"{tests}\ncheck({entry_point})\n" if entry_point else tests
    return run_python([("solution.py", program), ("tests.py", script)], limits=limits).finished
  if not parsed.constant_ok:
    return False
  result = run_python([("solution.py", program), ("tests.py", parsed.setup)], calls=parsed.calls, limits=limits)
  return result.finished and _matches(result.values, parsed.checks,
                                      lambda value, check: CHECKS[check[0]](value, check[1]))


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
