"""Hostile code is contained and scored 0 while this process survives and the reward pool keeps working;
batch scoring counts verifier failures instead of raising."""

import os
import socket
import time

import numpy as np
import pytest

from mcpo_jax import rewards

SECRET = "mcpo-test-secret-71d3"


@pytest.fixture(scope="module")
def pool():
  os.environ["MCPO_TEST_SECRET"] = SECRET  # the spawned workers inherit it: candidates must not see it
  with rewards.RewardPool(processes=2, timeout_s=60) as reward_pool:
    yield reward_pool
  os.environ.pop("MCPO_TEST_SECRET")


def _code(body: str) -> str:
  return f"```python\n{body}\n```"


def test_hostile_code_is_contained(pool, tmp_path):
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen()
  listener.setblocking(False)
  port, outside = listener.getsockname()[1], tmp_path / "escaped.txt"
  # Each test passes only if the attack worked, so a contained attack scores 0.
  attacks = {
      "infinite loop": "while True:\n    pass",
      "fork bomb": "import os\nwhile True:\n    os.fork()",
      "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])",
      "10 GB allocation": "block = bytearray(10 * 2**30)\nblock[-1] = 1",
      "write outside": f"open({str(outside)!r}, 'w').write('x')",
      "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')",
      "parent env": (f"import os\nassert os.environ.get('MCPO_TEST_SECRET') == {SECRET!r} or "
                     f"{SECRET!r} in open(f'/proc/{{os.getppid()}}/environ').read()"),
      "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
      "kill tester": f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)",
      "raise limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nbytearray(10 * 2**30)",
  }
  examples = [{"tests": "assert True", "time_limit_s": 1.0, "domain": name} for name in attacks]
  started = time.monotonic()
  result = pool.score([_code(body) for body in attacks.values()], examples, ["code"] * len(attacks))
  assert time.monotonic() - started < 20
  assert result.accuracy == {name: 0.0 for name in attacks}
  assert result.errors == 0  # contained, not crashed: every worker answered in time
  assert not outside.exists()
  with pytest.raises(BlockingIOError):
    listener.accept()
  listener.close()
  # The pool still works: a right answer scores 1.
  after = pool.score([_code("def f():\n    return 1")], [{"tests": "assert f() == 1"}], ["code"])
  assert after.rewards.tolist() == [1.0]


def test_batch_scoring_counts_failures_and_reports_accuracy(pool):
  completions = [r"\boxed{4}", r"\boxed{5}", "<answer>B</answer>", "oops", r"\boxed{4}"]
  examples = [{"answer": "4", "domain": "algebra"}, {"answer": "4", "domain": "algebra"},
              {"answer": "B", "choices": ["x", "y"], "domain": "science"}, {"domain": "science"},  # no answer
              {"answer": "4"}]
  names = ["math", "math", "choice", "choice", "math"]
  result = pool.score(completions, examples, names)
  assert result.rewards.dtype == np.float32 and result.rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
  assert result.correct.tolist() == [True, False, True, False, True]
  # the last row has no domain: it is grouped by its verifier
  assert result.accuracy == {"algebra": 0.5, "science": 0.5, "math": 1.0}
  assert result.errors == 1 and "KeyError" in result.first_error
  with pytest.raises(ValueError, match="known verifiers"):
    pool.score(["x"], [{}], ["cod"])
  with pytest.raises(ValueError, match="one of each per row"):
    pool.score(["x", "y"], [{}], ["code"])


def test_format_reward_is_a_separate_term():
  examples = [{"answer": "4", "answer_format": "boxed"}] * 3
  result = rewards.score_batch([r"\boxed{4}", "The answer is 4", r"\boxed{5}"], examples, ["math"] * 3,
                               processes=0, format_weight=0.1)
  assert np.allclose(result.rewards, [1.1, 1.0, 0.1]) and result.correct.tolist() == [True, True, False]


def test_a_stuck_batch_is_scored_zero_and_the_pool_replaced():
  with rewards.RewardPool(processes=1, timeout_s=2.0) as pool:  # worker start-up takes ~1 s
    slow = {"tests": "assert True", "time_limit_s": 5.0}
    result = pool.score([_code("while True:\n    pass")], [slow], ["code"])
    assert result.rewards.tolist() == [0.0] and result.errors == 1 and "deadline" in result.first_error
    assert pool.score(["(A)"], [{"answer": "A"}], ["choice"]).rewards.tolist() == [1.0]


def test_unsafe_mode_is_explicit_and_warns_once(monkeypatch, capsys):
  from mcpo_jax.rewards import pool as pool_module
  from mcpo_jax.rewards import sandbox
  monkeypatch.setattr(pool_module, "_warned_unsafe", False)
  try:
    for _ in range(2):
      with rewards.RewardPool(processes=0, sandbox="unsafe") as inline:
        result = inline.score([_code("def f():\n    return 1"), _code("import os\nos._exit(0)")],
                              [{"tests": "assert f() == 1"}] * 2, ["code"] * 2)
        assert result.rewards.tolist() == [1.0, 0.0]
    assert capsys.readouterr().err.count("rewards.sandbox='unsafe'") == 1
  finally:
    sandbox.set_mode("bwrap")
  with pytest.raises(ValueError, match="rewards.sandbox='nope'"):
    rewards.RewardPool(processes=0, sandbox="nope")


def test_the_config_field_is_checked():
  from configs.multi_domain import get_config
  from mcpo_jax import config as config_lib
  config = get_config("tiny")
  assert config.rewards.sandbox == "bwrap"
  config.rewards.sandbox = "none"
  with pytest.raises(config_lib.ConfigError, match="rewards.sandbox"):
    config_lib.build(config)


def test_asserts_are_parsed_into_trusted_calls_and_other_tests_are_counted(pool):
  from mcpo_jax.rewards.code import harness, parse_asserts
  human_eval = ("METADATA = {}\n\ndef check(candidate):\n    assert candidate([1, 2]) == 3\n"
                "    assert not candidate([])\n")
  parsed = parse_asserts(human_eval, "total")
  assert parsed.calls == ("total([1, 2])", "total([])") and parsed.checks == (("==", 3), ("falsy", None))
  mbpp = "import math\nassert f(1, x=(2, 3)) != [4]\nassert Solution().g('a')\nassert True"
  parsed = parse_asserts(mbpp, None)
  assert parsed.setup == "import math" and parsed.calls == ("f(1, x=(2, 3))", "Solution().g('a')")
  # Anything the parent cannot compare by itself is a script: an operator on the candidate's value, a call
  # in the arguments, a loop, a non-literal expected value.
  for script in ("assert abs(f(1) - 2) < 1e-6", "assert f(g(1)) == 2", "for x in range(3):\n    assert f(x) == x",
                 "assert f(1) == g(1)", "assert f(1) == 2 == 2", "x = f(1)\nassert x == 2"):
    assert parse_asserts(script, None) is None and harness({"tests": script}) == "script"
  assert harness({"tests": {"inputs": [], "outputs": []}}) == "io"
  assert harness({"tests": {"inputs": [], "outputs": [], "fn_name": "f"}}) == "calls"
  program = _code("def f(x):\n    return x")
  result = pool.score([program] * 3, [{"tests": "assert f(1) == 1"}, {"tests": "assert abs(f(1) - 1) < 1e-6"},
                                      {"tests": "assert f(1) == 2"}], ["code"] * 3)
  assert result.rewards.tolist() == [1.0, 1.0, 0.0] and result.untrusted_tests == 1


def test_returned_values_are_compared_with_python_semantics_in_the_parent():
  cases = [("return (1, 2)", "assert f() == (1, 2)", 1.0), ("return [1, 2]", "assert f() == (1, 2)", 0.0),
           ("return 2", "assert f() == 2.0", 1.0), ("return {'a': {1, 2}}", "assert f() == {'a': {2, 1}}", 1.0),
           ("return b'x'", "assert f() == b'x'", 1.0), ("return print", "assert f()", 0.0),
           ("raise SystemExit(0)", "assert not f()", 0.0)]
  for body, tests, want in cases:
    assert rewards.get("code")(_code(f"def f():\n    {body}"), {"tests": tests}) == want, (body, tests)
