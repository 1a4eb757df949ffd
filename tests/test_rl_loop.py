"""The RL loop end to end on a tiny model: metrics, checkpoints, exact resume after kill -9, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import learnable_flags

from mcpo_jax.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _command(model_dir, workdir, *extra):
  return [sys.executable, "run.py", "--config=configs/multi_domain.py:tiny", f"--config.model.name={model_dir}",
          f"--config.workdir={workdir}", "--config.rewards.processes=0", "--config.eval.at_start=false",
          "--config.eval.at_end=false", "--config.train.steps=4", *extra]


def _env():
  return dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")


def test_a_tiny_run_raises_the_reward_on_a_learnable_task(learnable_task, tmp_path):
  """run.py on the 8-device mesh, 10 MCPO steps: the reward and held-out pass@1 of both domains rise."""
  command = [sys.executable, "run.py", "--config=configs/multi_domain.py:tiny", f"--config.workdir={tmp_path}",
             *learnable_flags(learnable_task, steps=10)]
  result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "'fsdp': 8" in result.stdout
  rewards = [read_metrics(tmp_path)[step]["reward"] for step in range(1, 11)]
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards  # the random policy: about 1/16
  evaluations = json.loads((tmp_path / "evaluations.json").read_text())
  for domain in ("three", "seven"):
    assert evaluations["end"][f"eval/{domain}/pass@1"] >= evaluations["start"][f"eval/{domain}/pass@1"] + 0.5


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
  reference = subprocess.run(_command(tiny_model_dir, tmp_path / "ref"), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=600)
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert "step 4/4" in reference.stdout
  want = read_metrics(tmp_path / "ref")
  assert sorted(want) == [1, 2, 3, 4]
  assert "diag/grad_cosine" in want[2] and len(want[2]["diag/grad_cosine"]) == 3  # 3 domains: a 3×3 matrix
  assert (tmp_path / "ref" / "tensorboard").is_dir()

  interrupted = tmp_path / "interrupted"  # given relative to the cwd, as users do (`runs/default`)
  relative = os.path.relpath(interrupted, REPO)
  process = subprocess.Popen(_command(tiny_model_dir, relative), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not (interrupted / "checkpoints" / "2").is_dir() and process.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = subprocess.run(_command(tiny_model_dir, relative), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout
  got = read_metrics(interrupted)
  compared = [k for k in ("loss", "reward", "pg_loss", "kl", "contrastive", "entropy", "grad_norm") if k in want[4]]
  assert {"loss", "grad_norm", "entropy"} <= set(compared)
  for step in (3, 4):
    for name in compared:
      assert abs(got[step][name] - want[step][name]) <= 1e-6, (step, name, got[step][name], want[step][name])


def test_sigterm_leaves_a_complete_checkpoint(tiny_model_dir, tmp_path):
  workdir = tmp_path / "term"
  process = subprocess.Popen(_command(tiny_model_dir, workdir, "--config.train.steps=50",
                                      "--config.checkpoint.every=100"),
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode != 0 and "preempted: checkpoint of step" in stderr, stderr[-2000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and np.all(np.array(steps) < 50)
