"""The RL loop end to end on a tiny model: metrics, checkpoints, exact resume after kill -9, SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_checkpoint

from mcpo_jax.model import resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
  """A 2-layer random Llama with the SmolLM2 vocabulary and tokenizer (so prompts and verifiers are real)."""
  directory = tmp_path_factory.mktemp("tiny_smollm")
  write_tiny_checkpoint("llama", directory, vocab_size=49152, hidden_size=64, intermediate_size=128,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        bos_token_id=1, eos_token_id=2)
  smollm = Path(resolve_checkpoint("smollm2-135m-instruct"))
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (smollm / name).exists():
      shutil.copy(smollm / name, directory / name)
  return directory


def _command(model_dir, workdir, *extra):
  return [sys.executable, "run.py", "--config=configs/multi_domain.py:tiny", f"--config.model.name={model_dir}",
          f"--config.workdir={workdir}", "--config.rewards.processes=0", "--config.eval.at_start=false",
          "--config.eval.at_end=false", "--config.train.steps=4", *extra]


def _env():
  return dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")


def _metrics(workdir) -> dict[int, dict]:
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {record["step"]: record for record in map(json.loads, lines)}  # a resumed step overwrites its earlier try


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
  reference = subprocess.run(_command(tiny_model_dir, tmp_path / "ref"), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=600)
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert "step 4/4" in reference.stdout
  want = _metrics(tmp_path / "ref")
  assert sorted(want) == [1, 2, 3, 4]
  assert "diag/grad_cosine" in want[2] and len(want[2]["diag/grad_cosine"]) == 3  # 3 domains: a 3×3 matrix
  assert (tmp_path / "ref" / "tensorboard").is_dir()

  interrupted = tmp_path / "interrupted"
  process = subprocess.Popen(_command(tiny_model_dir, interrupted), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not (interrupted / "checkpoints" / "2").is_dir() and process.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = subprocess.run(_command(tiny_model_dir, interrupted), cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout
  got = _metrics(interrupted)
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
