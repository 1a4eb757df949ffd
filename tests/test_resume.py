"""Resuming never loses a run (tiny preset, real orbax checkpoints): an incompatible config is refused and
leaves every file byte-identical, resume=none refuses or moves the old run aside, a finished run is not
touched again, and a corrupt newest checkpoint is moved aside while the run continues past it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from test_metrics import purged_event_scalars

from mcpo_jax.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def run_py(model_dir, workdir, *extra, timeout=600) -> subprocess.CompletedProcess:
  command = [sys.executable, "run.py", "--config=configs/multi_domain.py:tiny", f"--config.model.name={model_dir}",
             f"--config.workdir={workdir}", "--config.rewards.processes=0", "--config.eval.at_start=false",
             "--config.eval.at_end=false", *extra]
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(directory: Path) -> dict[str, str]:
  """{relative path: sha256} of every file under `directory`."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
  """A complete 2-step run (checkpoints 1 and 2, metrics, TensorBoard); tests work on copies of it."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  result = run_py(tiny_model_dir, workdir, "--config.train.steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_a_run_is_never_overwritten_or_resumed_under_another_config(tiny_model_dir, finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  before = snapshot(workdir)
  assert any(name.startswith("checkpoints/2/") for name in before) and "metrics.jsonl" in before

  started = time.perf_counter()
  changed = run_py(tiny_model_dir, workdir, "--config.train.steps=4", "--config.objective.proj_dim=32")
  assert changed.returncode != 0 and time.perf_counter() - started < 60  # before the model loads
  message = changed.stderr.strip().splitlines()[-1]
  assert "objective.proj_dim=16 in the checkpoint, 32 now" in message, message
  assert "--config.workdir" in message and "--config.resume=none --config.overwrite=true" in message
  assert snapshot(workdir) == before

  fresh = run_py(tiny_model_dir, workdir, "--config.train.steps=2", "--config.resume=none")
  assert fresh.returncode != 0
  message = fresh.stderr.strip().splitlines()[-1]
  assert "holds a previous run (checkpoints, metrics.jsonl" in message and "--config.overwrite=true" in message
  assert snapshot(workdir) == before

  again = run_py(tiny_model_dir, workdir, "--config.train.steps=2")  # the finished run's own command
  assert again.returncode == 0, again.stderr[-3000:]
  assert "is complete (step 2)" in again.stdout
  assert snapshot(workdir) == before

  overwritten = run_py(tiny_model_dir, workdir, "--config.train.steps=1", "--config.resume=none",
                       "--config.overwrite=true")
  assert overwritten.returncode == 0, overwritten.stderr[-3000:]
  (aside,) = tmp_path.glob("run.overwritten-*")
  assert snapshot(aside) == before
  assert sorted(read_metrics(workdir)) == [1]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_run_continues(tiny_model_dir, finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  want = read_metrics(workdir)
  data_files = [p for p in (workdir / "checkpoints" / "2" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:  # every array chunk of step 2 unreadable: a disk error, not a config change
    path.write_bytes(b"not an ocdbt chunk")
  corrupt = snapshot(workdir / "checkpoints" / "2")

  result = run_py(tiny_model_dir, workdir, "--config.train.steps=4", "--config.checkpoint.keep_last=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from" in result.stdout and "at step 1" in result.stdout
  warnings = [line for line in result.stderr.splitlines() if "cannot be read" in line]
  assert len(warnings) == 1 and "corrupt/2" in warnings[0], result.stderr[-3000:]
  assert "Event loop is closed" not in result.stderr and "Traceback" not in result.stderr
  assert snapshot(workdir / "checkpoints" / "corrupt" / "2") == corrupt  # kept for inspection
  assert {p.name for p in (workdir / "checkpoints").iterdir()} == {"1", "2", "3", "4", "corrupt"}  # 2 saved again

  rows = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert rows == [1, 2, 3, 4]  # the re-trained step 2 once, the earlier try's row dropped
  got = read_metrics(workdir)
  assert got[1] == want[1] and abs(got[2]["loss"] - want[2]["loss"]) <= 1e-6  # step 2 re-trained from step 1
  scalars = purged_event_scalars(workdir / "tensorboard")
  assert sorted(step for step, tag in scalars if tag == "loss") == [1, 2, 3, 4]
  for step in (1, 2, 3, 4):  # TensorBoard, as it reads the two runs' event files, agrees with metrics.jsonl
    assert scalars[(step, "loss")] == pytest.approx(got[step]["loss"], rel=1e-6, abs=1e-7)


def test_a_different_state_layout_is_refused_and_unreadable_data_is_moved_aside(tmp_path):
  """In process, on a small pytree: a shape change past the config check is an incompatibility (ResumeError,
  files untouched); unreadable bytes are corruption (moved to corrupt/<step>, the step before restored)."""
  import jax.numpy as jnp
  import numpy as np

  from configs.multi_domain import get_config
  from mcpo_jax.checkpointing import Checkpointer, ResumeError, abstract_like

  config = get_config("tiny")
  state = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3)}
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep_last=3)
  for step in (1, 2):
    checkpointer.save(step, jax.tree.map(lambda x: x * step, state), {"data": {}, "config": config.to_json()})
  checkpointer.wait()
  before = snapshot(tmp_path)

  wider = abstract_like({"w": jnp.zeros((2, 4)), "b": jnp.ones(3)})
  with pytest.raises(ResumeError, match=r"w: float32\[2, 3\] in the checkpoint, float32\[2, 4\] now"):
    checkpointer.restore_latest(wider, config)
  with pytest.raises(ResumeError, match="c: not in the checkpoint"):
    checkpointer.restore_latest(abstract_like({**state, "c": jnp.ones(1)}), config)
  assert snapshot(tmp_path) == before

  for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"garbage")
  step, restored, extra = checkpointer.restore_latest(abstract_like(state), config)
  assert step == 1 and extra["data"] == {}
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert checkpointer.steps() == [1] and (tmp_path / "checkpoints" / "corrupt" / "2" / "state").is_dir()
  checkpointer.save(2, state, {"data": {}, "config": config.to_json()})  # the step can be saved again
  checkpointer.close()
  assert (tmp_path / "checkpoints" / "2" / "commit_success.txt").exists()


def test_the_echoes_of_a_failed_read_are_dropped_and_other_task_errors_are_kept(tmp_path):
  """A failed read's sibling tasks die with the same read error, logged by asyncio whenever they are
  garbage-collected (the moment varies: the CI flake this test pins). Only those, for this checkpoint
  directory, and tensorstore's "Event loop is closed" are dropped; any other task error still shows."""
  import asyncio
  import gc
  import logging

  from mcpo_jax import checkpointing

  directory = tmp_path / "run" / "checkpoints"
  checkpointing.Checkpointer(directory, async_save=False).close()  # installs the filter, like every resume
  errors = {
      "echo": ValueError(f'OUT_OF_RANGE: Error opening "zarr" driver: Error reading "x/.zarray" in OCDBT '
                         f'database at local file "{directory}/2/state/": Requested byte range is not valid'),
      "closed": RuntimeError("Event loop is closed"),
      "other directory": ValueError('Error reading "x/.zarray" at local file "/elsewhere/checkpoints/2/state/"'),
      "not a read": ValueError(f"cannot write {directory}/3"),
  }
  seen = []

  class Catch(logging.Handler):
    def emit(self, record):
      seen.append(str(record.exc_info[1]))

  handler = Catch()
  logging.getLogger("asyncio").addHandler(handler)
  try:
    for error in errors.values():
      async def fail(error=error):
        raise error
      loop = asyncio.new_event_loop()
      task = loop.create_task(fail())
      loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody retrieves it
      loop.close()
      del task
      gc.collect()  # asyncio logs "Task exception was never retrieved" here
  finally:
    logging.getLogger("asyncio").removeHandler(handler)
  assert seen == [str(errors["other directory"]), str(errors["not a read"])]
