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
