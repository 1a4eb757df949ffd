"""The comparison experiment end to end on the tiny preset: every arm × seed really runs, every table
cell comes from a run's own final evaluation, and a rerun skips the finished runs and reproduces
the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import learnable_flags

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
STEPS = 2


def _compare(learnable_task, tmp_path) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "mcpo_jax.experiments.compare", "--config=configs/multi_domain.py:tiny",
             *learnable_flags(learnable_task, STEPS), "--config.eval.every=1", "--config.eval.k=0",
             f"--seeds={','.join(map(str, SEEDS))}", f"--runs_dir={tmp_path / 'runs'}", f"--out={tmp_path / 'out'}"]
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_comparison_runs_every_arm_and_reports_them(learnable_task, tmp_path):
  result = _compare(learnable_task, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  domains = ["seven", "three"]
  arms = ["grpo-single-seven", "grpo-single-three", "grpo-mixed", "mcpo", "mcpo-no-cross", "mcpo-no-in",
          "mcpo-head-only", "mcpo-reward-coupling"]
  final = {}
  for arm in arms:
    for seed in SEEDS:
      workdir = tmp_path / "runs" / arm / f"seed{seed}"
      steps = sorted(int(p.stem.split("_")[1]) for p in (workdir / "eval").glob("step_*.json"))
      assert steps == [0, 1, STEPS], (arm, seed, steps)
      final[arm, seed] = json.loads((workdir / "eval" / f"step_{STEPS:06d}.json").read_text())
      config = json.loads((workdir / "checkpoints" / str(STEPS) / "extra" / "metadata").read_text())["config"]
      config = json.loads(config)
      assert config["seed"] == seed
      assert config["algorithm"] == ("grpo" if arm.startswith("grpo") else "mcpo")

  rows = json.loads((tmp_path / "out" / "compare.json").read_text())
  by_label = dict(rows)
  assert len(by_label) == 1 + 1 + 6  # the start, one row for the single-domain specialists, 6 arms
  assert by_label["MCPO"]["seven"] == [final["mcpo", s]["eval/seven/pass@1"] for s in SEEDS]
  assert by_label["GRPO, mixed domains"]["three"] == [final["grpo-mixed", s]["eval/three/pass@1"] for s in SEEDS]
  specialists = by_label["GRPO, single-domain (one run per domain)"]
  for domain in domains:
    assert specialists[domain] == [final[f"grpo-single-{domain}", s][f"eval/{domain}/pass@1"] for s in SEEDS]
  for label, row in rows.items():
    assert set(row) == {*domains, "average"}, label
    for column, values in row.items():
      assert len(values) == len(SEEDS) and np.all(np.isfinite(values)), (label, column, values)
  report = (tmp_path / "out" / "compare.md").read_text()
  table = [line for line in report.splitlines() if line.startswith("| ") and "±" in line]
  assert len(table) == len(rows) and all(line.count("±") == 3 for line in table) and "nan" not in report
  assert "MCPO − mixed GRPO" in report
  for figure in ("accuracy_curves.png", "interference.png"):
    assert (tmp_path / "out" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  rerun = _compare(learnable_task, tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.count("complete, skipped") == len(arms) * len(SEEDS)
  assert json.loads((tmp_path / "out" / "compare.json").read_text()) == rows
