"""The reward pool and the trainer around the sandbox: workers ignore SIGTERM and share no lock, close()
is bounded, 200 open → score → close cycles with a hostile program leave nothing behind, a tiny RL run
whose code rows are the hostile set completes with its checkpoints intact, and SIGTERM to a tiny run's
process group, at 5 moments, ends it within a bound with no process left."""

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_sandbox_hostile import escapes

from mcpo_jax import rewards
from mcpo_jax.metrics import read_metrics
from mcpo_jax.rewards import sandbox

REPO = Path(__file__).resolve().parents[1]
PR_SET_CHILD_SUBREAPER = 36
LOOP = "```python\nwhile True:\n    pass\n```"
# run.py with RewardPool.score replacing each code completion by the next program of $MCPO_HOSTILE, and
# touching $MCPO_SCORING_MARK when it starts
HOSTILE_RUN = """
import itertools, json, os, sys
sys.path.insert(0, os.getcwd())
from absl import app
import run
from mcpo_jax.rewards import pool
programs = itertools.cycle(json.loads(os.environ["MCPO_HOSTILE"]))
original = pool.RewardPool.score
def score(self, completions, examples, names):
  open(os.environ["MCPO_SCORING_MARK"], "a").close()  # the test's cue: scoring is under way
  completions = [f"```python\\n{next(programs).replace('TRAINER_PID', str(os.getpid()))}\\n```" if name == "code"
                 else completion for completion, name in zip(completions, names)]
  return original(self, completions, examples, names)
pool.RewardPool.score = score
app.run(run.main, flags_parser=run.parse_flags)
"""

pytestmark = pytest.mark.skipif(sandbox.unavailable_reason() is not None, reason="bubblewrap sandbox unavailable")


@pytest.fixture
def subreaper():
  """Orphans of this test's processes are re-parented here; yields a function listing this process's children."""
  libc = ctypes.CDLL(None)
  libc.prctl(PR_SET_CHILD_SUBREAPER, 1)

  def children() -> list[int]:
    """Live ones: a killed worker's sandbox is dead at once (PDEATHSIG) but waits as a zombie for its adopter."""
    mine = []
    for entry in Path("/proc").iterdir():
      try:
        state, ppid = entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
      except (OSError, ValueError, TypeError):
        continue
      if int(ppid) == os.getpid() and state != "Z":
        mine.append(int(entry.name))
    return mine

  def left(settle_s: float = 2.0) -> list[int]:
    """Live children not there before, after up to `settle_s` for SIGKILLed ones to finish dying."""
    deadline = time.monotonic() + settle_s
    while (alive := sorted(set(children()) - before)) and time.monotonic() < deadline:
      time.sleep(0.05)
    return alive

  before = set(children())
  yield left
  libc.prctl(PR_SET_CHILD_SUBREAPER, 0)


def _example(**extra) -> dict:
  return {"tests": "assert f(1) == 2", "time_limit_s": 0.5, **extra}


def test_workers_ignore_sigterm_and_close_is_bounded(subreaper):
  pool = rewards.RewardPool(processes=2, timeout_s=30, close_timeout_s=1.0)
  assert pool.score(["```python\ndef f(x):\n    return 2 * x\n```"], [_example()], ["code"]).rewards.tolist() == [1.0]
  workers = [worker.process for worker in pool._workers]
  for worker in workers:
    os.kill(worker.pid, signal.SIGTERM)
  time.sleep(0.5)
  assert all(worker.poll() is None for worker in workers)  # still alive: SIGTERM is the trainer's
  # A worker stuck in a verifier is killed at close's deadline.
  pool._workers[0].tasks.send((0, "code", LOOP, _example(time_limit_s=30.0)))
  time.sleep(1.0)
  started = time.monotonic()
  pool.close()
  assert time.monotonic() - started < 3.0
  assert all(worker.poll() is not None for worker in workers)
  pool.close()  # idempotent
  assert subreaper() == []


def test_a_worker_that_dies_is_replaced_and_its_row_retried_once():
  with rewards.RewardPool(processes=1, timeout_s=30) as pool:
    os.kill(pool._workers[0].process.pid, signal.SIGKILL)
    result = pool.score(["```python\ndef f(x):\n    return 2 * x\n```"] * 2, [_example()] * 2, ["code"] * 2)
    assert result.rewards.tolist() == [1.0, 1.0] and result.errors == 0  # replaced before the batch
    def kill_the_worker_twice():
      """Each time the worker holding the row is running its sandbox (it has a child), SIGKILL it."""
      killed = set()
      deadline = time.monotonic() + 60
      while len(killed) < 2 and time.monotonic() < deadline:
        pids = [worker.process.pid for worker in list(pool._workers)]
        for pid in set(pids) - killed:
          try:
            busy = bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
          except OSError:  # gone already
            continue
          if busy:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)

    killer = threading.Thread(target=kill_the_worker_twice)
    killer.start()
    result = pool.score([LOOP], [_example(time_limit_s=20.0)], ["code"])
    killer.join()
    assert result.rewards.tolist() == [0.0] and result.errors == 1 and "died twice" in result.first_error
    assert pool.score(["(A)"], [{"answer": "A"}], ["choice"]).rewards.tolist() == [1.0]


def test_200_open_score_close_cycles_leave_nothing_behind(subreaper):
  fds = len(os.listdir("/proc/self/fd"))
  batch = ["```python\ndef f(x):\n    return 2 * x\n```", "```python\nimport os\nwhile True:\n    os.fork()\n```",
           LOOP]
  failures = []

  def cycles(count: int) -> None:
    for _ in range(count):
      with rewards.RewardPool(processes=1, timeout_s=30, close_timeout_s=2.0) as pool:
        result = pool.score(batch, [_example(time_limit_s=limit) for limit in (5.0, 0.2, 0.2)], ["code"] * 3)
        if result.rewards.tolist() != [1.0, 0.0, 0.0]:
          failures.append(result)

  threads = [threading.Thread(target=cycles, args=(50,)) for _ in range(4)]  # 4 pools at a time, 200 in all
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert failures == []
  assert subreaper() == []
  assert len(os.listdir("/proc/self/fd")) == fds


def _hostile_run(tmp_path, workdir: Path, *extra: str) -> subprocess.Popen:
  """A tiny GRPO run on one code domain whose every completion is replaced by a hostile program."""
  paths = {}
  for split in ("train", "test"):
    paths[split] = str(tmp_path / f"code_{split}.jsonl")
    Path(paths[split]).write_text("".join(json.dumps({"question": f"Write f ({split} {i}).", "tests": "assert True"})
                                          + "\n" for i in range(16)))
  domains = {"code": {"source": {"kind": "jsonl", "fields": {"prompt": "question", "tests": "tests"}, "path": paths},
                      "verifier": "code"}}
  world = {"root": tmp_path, "workdir": workdir, "port": 9}
  programs = list(escapes(world).values()) + ["import os, signal\nos.kill(TRAINER_PID, signal.SIGKILL)"]
  script = tmp_path / "hostile_run.py"
  script.write_text(HOSTILE_RUN)
  command = [sys.executable, str(script), "--config=configs/multi_domain.py:tiny", f"--config.workdir={workdir}",
             f"--config.model.name={tmp_path.parent / 'model'}", f"--config.data.domains={domains!r}",
             "--config.algorithm=grpo", "--config.rewards.processes=2", "--config.eval.at_start=false",
             "--config.eval.at_end=false", *extra]
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8",
             MCPO_HOSTILE=json.dumps(programs), MCPO_SCORING_MARK=str(tmp_path / "scoring"))
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
  """The tiny model at <run root>/model, the path _hostile_run expects."""
  root = tmp_path_factory.mktemp("runs")
  (root / "model").symlink_to(tiny_model_dir)
  return root


def test_a_tiny_rl_run_on_hostile_code_completes_with_intact_checkpoints(model_dir, subreaper):
  tmp_path = model_dir / "complete"
  tmp_path.mkdir()
  workdir = tmp_path / "work"
  process = _hostile_run(tmp_path, workdir, "--config.train.steps=3")
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  metrics = read_metrics(workdir)
  assert sorted(metrics) == [1, 2, 3] and all(metrics[step]["reward"] == 0.0 for step in metrics)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] == 3
  assert not (workdir / "checkpoints" / "1" / "planted").exists() and not (tmp_path / "escaped.txt").exists()
  assert subreaper() == []


@pytest.mark.parametrize("moment", ["1 s in", "5 s in", "10 s in", "while scoring", "at the first metrics"])
def test_sigterm_to_the_process_group_ends_the_run_with_nothing_left(model_dir, subreaper, moment):
  tmp_path = model_dir / moment.replace(" ", "_")
  tmp_path.mkdir()
  workdir = tmp_path / "work"
  process = _hostile_run(tmp_path, workdir, "--config.train.steps=50", "--config.checkpoint.every=100")
  deadline = time.monotonic() + 600
  cue = {"while scoring": tmp_path / "scoring", "at the first metrics": workdir / "metrics.jsonl"}.get(moment)
  if cue is None:
    time.sleep(float(moment.split()[0]))
  while cue is not None and not cue.exists() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert process.poll() is None, process.communicate()[1][-3000:]
  os.killpg(process.pid, signal.SIGTERM)
  signalled = time.monotonic()
  _, stderr = process.communicate(timeout=300)
  assert time.monotonic() - signalled < 120, stderr[-2000:]
  assert process.returncode in (-signal.SIGTERM, 75), stderr[-3000:]  # killed before the guard, or preempted
  assert "Segmentation fault" not in stderr and process.returncode != -signal.SIGSEGV
  time.sleep(0.5)
  assert subreaper() == []
