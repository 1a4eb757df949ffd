"""The comparison experiment end to end on the tiny preset: every arm × seed really runs, every table
cell (accuracy and difference CIs, constant-answer baselines, collapse flags, answer shares) comes from
the runs' own per-prompt evaluation records, and a rerun skips the finished runs and reproduces the
report."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import learnable_flags

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1)
STEPS = 2
K = 2


def _compare(learnable_task, tmp_path) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "mcpo_jax.experiments.compare", "--config=configs/multi_domain.py:tiny",
             *learnable_flags(learnable_task, STEPS), "--config.eval.every=1", f"--config.eval.k={K}",
             f"--seeds={','.join(map(str, SEEDS))}", f"--runs_dir={tmp_path / 'runs'}", f"--out={tmp_path / 'out'}"]
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_comparison_runs_every_arm_and_reports_them(learnable_task, tmp_path):
  result = _compare(learnable_task, tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  domains = ["seven", "three"]
  arms = ["grpo-single-seven", "grpo-single-three", "grpo-mixed", "mcpo", "mcpo-no-cross", "mcpo-no-in",
          "mcpo-head-only", "mcpo-reward-warmup"]
  final = {}
  for arm in arms:
    for seed in SEEDS:
      workdir = tmp_path / "runs" / arm / f"seed{seed}"
      steps = sorted(int(p.stem.split("_")[1]) for p in (workdir / "eval").glob("step_*.json"))
      start = (arm, seed) == ("grpo-mixed", SEEDS[0])  # one evaluation of the initial policy, the start row's
      assert steps == [0] * start + [1, STEPS], (arm, seed, steps)
      final[arm, seed] = json.loads((workdir / "eval" / f"step_{STEPS:06d}.json").read_text())
      config = json.loads((workdir / "checkpoints" / str(STEPS) / "extra" / "metadata").read_text())["config"]
      config = json.loads(config)
      assert config["seed"] == seed
      assert config["algorithm"] == ("grpo" if arm.startswith("grpo") else "mcpo")

  for arm, seed in final:  # the per-prompt records behind every summary number
    workdir = tmp_path / "runs" / arm / f"seed{seed}"
    records = [json.loads(line) for line in (workdir / "eval" / f"step_{STEPS:06d}.per_prompt.jsonl").open()]
    for domain in domains:  # a single-domain arm too: its other domain is evaluated, never trained on
      rows = [r for r in records if r["domain"] == domain]
      assert len(rows) == 8 and len({r["prompt_hash"] for r in rows}) == 8, (arm, domain)
      assert all(len(r["sampled_correct"]) == len(r["sampled_answers"]) == K for r in rows)
      assert np.mean([r["greedy_correct"] for r in rows]) == final[arm, seed][f"eval/{domain}/pass@1"]
      assert np.mean([r["sampled_correct"] for r in rows]) == final[arm, seed][f"eval/{domain}/mean@{K}"]
      # every reference answer of the learnable task is the domain's digit: one answer scores 1.0
      assert final[arm, seed][f"eval/{domain}/constant_baseline"] == 1.0

  for seed in SEEDS:  # the specialist's batches held its own domain only
    metrics = tmp_path / "runs" / "grpo-single-three" / f"seed{seed}" / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.open()]
    trained = [row for row in steps if "three/reward" in row]
    assert len(trained) == STEPS and not any("seven/reward" in row for row in steps)

  report_data = json.loads((tmp_path / "out" / "compare.json").read_text())
  assert report_data["constant_baseline"] == {"seven": 1.0, "three": 1.0}
  for metric, field in (("pass@1", "pass@1"), (f"mean@{K}", f"mean@{K}")):
    stats = report_data["metrics"][metric]
    accuracy, difference = stats["accuracy"], stats["difference"]
    # start, the specialists' row, one row per specialist, mixed GRPO (the reference) and 5 MCPO arms
    assert len(accuracy) == 1 + 1 + 2 + 1 + 5 and len(difference) == 1 + 2 + 5
    mcpo = np.mean([final["mcpo", s][f"eval/seven/{field}"] for s in SEEDS])
    assert np.isclose(accuracy["MCPO"]["seven"]["estimate"], mcpo)
    for trained, other in (("three", "seven"), ("seven", "three")):
      own, probe = (np.mean([final[f"grpo-single-{trained}", s][f"eval/{d}/{field}"] for s in SEEDS])
                    for d in (trained, other))
      assert np.isclose(accuracy["GRPO, single-domain (each domain's own run)"][trained]["estimate"], own)
      assert np.isclose(accuracy[f"GRPO on {trained} only"][trained]["estimate"], own)
      assert np.isclose(accuracy[f"GRPO on {trained} only"][other]["estimate"], probe)  # the transfer probe
    mixed = np.mean([final["grpo-mixed", s][f"eval/three/{field}"] for s in SEEDS])
    assert np.isclose(difference["MCPO"]["three"]["estimate"],
                      np.mean([final["mcpo", s][f"eval/three/{field}"] for s in SEEDS]) - mixed)
    for label, row in accuracy.items():
      assert set(row) == {*domains, "average"}, label
      for column, cell in row.items():
        assert cell["low"] <= cell["estimate"] <= cell["high"] and np.isfinite(cell["se"]), (label, column)
        assert cell["collapsed"] == (cell["estimate"] <= 1.0), (label, column)  # nothing beats a constant here
    for label, row in difference.items():
      assert all(row[c]["verdict"].startswith("collapsed") for c in row), label  # never "better"
  report = (tmp_path / "out" / "compare.md").read_text()
  assert "nan" not in report and "constant-answer baseline" in report and "**collapsed**" in report
  assert "smallest detectable difference" in report and "MCPO − mixed GRPO" in report
  table = [line for line in report.splitlines() if line.startswith("| MCPO |")]
  assert len(table) == 2 * 2 + 1  # 2 metrics × (accuracy, difference), and the answer shares
  assert sum(line.count("[") == 3 for line in table) == 4  # a CI in each domain and the average
  for figure in ("accuracy_curves.png", "interference.png"):
    assert (tmp_path / "out" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Each run's evaluations are kept beside the report, without checkpoints.
  kept = tmp_path / "out" / "runs" / "runs"  # named after --runs_dir
  for arm, seed in final:
    for path in (tmp_path / "runs" / arm / f"seed{seed}" / "eval").glob("step_*"):
      assert (kept / arm / f"seed{seed}" / "eval" / path.name).read_bytes() == path.read_bytes()
  assert not list(kept.rglob("checkpoints"))

  # A rerun skips the finished runs; the one run deleted (and its kept copy) is trained again and reproduces its
  # evaluation exactly.
  redone = tmp_path / "runs" / "mcpo" / f"seed{SEEDS[-1]}"
  final_records = (redone / "eval" / f"step_{STEPS:06d}.per_prompt.jsonl").read_text()
  redone.rename(tmp_path / "mcpo-first-try")
  shutil.rmtree(kept / "mcpo" / f"seed{SEEDS[-1]}")
  rerun = _compare(learnable_task, tmp_path)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.count("complete, skipped") == len(arms) * len(SEEDS) - 1
  assert (redone / "eval" / f"step_{STEPS:06d}.per_prompt.jsonl").read_text() == final_records
  assert json.loads((tmp_path / "out" / "compare.json").read_text()) == report_data

  # Without any run directory (another machine), the kept evaluations alone give the same report.
  shutil.rmtree(tmp_path / "runs")
  from_kept = _compare(learnable_task, tmp_path)
  assert from_kept.returncode == 0, from_kept.stderr[-3000:]
  assert from_kept.stdout.count("complete, skipped") == len(arms) * len(SEEDS)
  assert json.loads((tmp_path / "out" / "compare.json").read_text()) == report_data


def test_statistics_flags_collapse_and_calls_only_what_the_interval_shows():
  from mcpo_jax.experiments.compare import MIXED, START, format_report, statistics
  rng = np.random.default_rng(0)
  draw = lambda p: (rng.random((2, 200)) < p).astype(float)  # [seeds, prompts] greedy corrects
  tables = {START: {"a": draw(0.3), "b": draw(0.3)}, MIXED: {"a": draw(0.3), "b": draw(0.3)},
            "MCPO": {"a": draw(0.6), "b": draw(0.3)},  # a planted +0.3 on a
            "collapsed arm": {"a": draw(0.45), "b": draw(0.45)}}  # better than mixed, but not than a constant
  baselines = {"a": 0.5, "b": 0.1}
  stats = statistics(tables, baselines, draws=1000)
  mcpo, collapsed = stats["difference"]["MCPO"], stats["difference"]["collapsed arm"]
  assert mcpo["a"]["verdict"].startswith("better, CI [+") and mcpo["a"]["low"] > 0
  assert mcpo["b"]["verdict"].startswith("no difference detected, CI [")
  assert not any(stats["accuracy"]["MCPO"][c]["collapsed"] for c in ("a", "b", "average"))
  assert collapsed["a"]["low"] > 0 and collapsed["a"]["verdict"].startswith("collapsed")
  flags = {c: stats["accuracy"]["collapsed arm"][c]["collapsed"] for c in ("a", "b", "average")}
  assert flags == {"a": True, "b": False, "average": False}
  assert collapsed["b"]["verdict"].startswith("better")  # 0.45 vs 0.3, above its baseline of 0.1
  assert mcpo["average"]["detectable"] == pytest.approx(2.8 * mcpo["average"]["se"])
  report = format_report(stats, "pass@1", baselines, {}, [0, 1])
  assert "| constant-answer baseline (best single answer) | 0.500 | 0.100 | 0.300 |" in report
  assert "- a: MCPO − mixed GRPO = " in report and "better, CI [" in report

  # A direct pair, MCPO − the collapsed arm: +0.15 on a (called better), −0.15 on b (called worse), each the
  # bootstrap of the per-(seed, prompt) differences themselves.
  paired = statistics(tables, baselines, pairs=[("MCPO", "collapsed arm")], draws=1000)["paired"]
  versus = paired["MCPO − collapsed arm"]
  for column in ("a", "b"):
    assert versus[column]["estimate"] == pytest.approx(
        np.mean(tables["MCPO"][column] - tables["collapsed arm"][column]))
  assert versus["a"]["verdict"].startswith("better") and versus["b"]["verdict"].startswith("worse")
  assert "### pass@1: MCPO − collapsed arm, paired by seed and prompt" in format_report(
      {**stats, "paired": paired}, "pass@1", baselines, {}, [0, 1])


def test_noise_floor_runs_on_a_real_evaluation(learnable_task, tmp_path):
  out = tmp_path / "floor.json"
  command = [sys.executable, "-m", "mcpo_jax.experiments.noise_floor", "--config=configs/multi_domain.py:tiny",
             *learnable_flags(learnable_task, 1), f"--config.eval.k={K}", f"--out={out}"]
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "noise floor eval: 16/16 prompts" in result.stdout and "smallest detectable mean@2" in result.stdout
  floor = json.loads(out.read_text())
  assert floor["summary"]["eval/seven/constant_baseline"] == 1.0 and f"eval/three/mean@{2 * K}" in floor["summary"]
  assert set(floor["floor"]) == {"seven", "three", "average"}
  assert all(np.isfinite(v["se"]) and v["se"] >= 0 for v in floor["floor"].values())


def test_every_arm_of_both_grids_builds_a_valid_config_that_differs_from_mixed_grpo(tmp_path):
  """Every --grid: each arm's config passes the builder, every grid holds mixed GRPO (the reference of every
  difference), the method grids the shipped MCPO, and no two arms are the same run."""
  from configs.multi_domain import get_config
  from mcpo_jax.config import build
  from mcpo_jax.experiments.compare import GRIDS, run_config
  base = get_config("compare")
  for grid, spec in GRIDS.items():
    arms = spec.arms(list(base.data.domains.keys()))
    names, labels = [arm.name for arm in arms], [arm.label for arm in arms]
    assert "grpo-mixed" in names and len(set(names)) == len(names), grid
    assert len(set(labels)) == len(labels), grid  # the report's rows are keyed by label
    assert "mcpo" in names or grid == "learning_rate"
    pinned = set()
    for arm in arms:
      run = build(run_config(base, arm, 0, str(tmp_path)))
      key = json.dumps({k: v for k, v in json.loads(run.to_json()).items() if k != "workdir"}, sort_keys=True)
      assert key not in pinned, (grid, arm.name)
      pinned.add(key)
    assert spec.stem in ("compare", "sweep", "learning_rate")
  rates = [build(run_config(base, arm, 0, str(tmp_path))).optim.learning_rate for arm in GRIDS["learning_rate"].arms([])]
  assert rates == [base.optim.learning_rate, base.optim.learning_rate / 2, base.optim.learning_rate * 2]


def test_a_first_seed_whose_mixed_run_has_no_start_evaluation_is_one_clear_error_before_any_training(tmp_path,
                                                                                                    monkeypatch):
  """--seeds=3 over kept runs trained in a 0..3 grid: mixed GRPO seed 3 made no step-0 evaluation, so the report's
  start row cannot exist; compare says so before training anything (it used to train, then fail with KeyError)."""
  from configs.multi_domain import get_config
  from mcpo_jax import rl_loop
  from mcpo_jax.experiments.compare import compare
  kept = tmp_path / "out" / "runs" / "runs" / "grpo-mixed" / "seed3"
  (kept / "eval").mkdir(parents=True)
  (kept / "eval" / "step_000040.json").write_text("{}")
  (kept / "evaluations.json").write_text(json.dumps({"end": {}}))
  monkeypatch.setattr(rl_loop, "train", lambda config: pytest.fail("trained before checking the start row"))
  with pytest.raises(ValueError, match="start row is the step-0 evaluation of grpo-mixed seed 3, and its finished "
                                       "run in .* has none.*--seeds=0"):
    compare(get_config("compare"), [3], str(tmp_path / "runs"), str(tmp_path / "out"), ["grpo-mixed", "mcpo"],
            "command")
