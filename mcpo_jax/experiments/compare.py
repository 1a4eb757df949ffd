"""Single-domain GRPO vs mixed-domain GRPO vs MCPO and its ablations, per domain, over seeds.

  python -m mcpo_jax.experiments.compare --config=configs/multi_domain.py[:preset] \
      [--config.<field>=<value> ...] [--seeds=0,1] [--runs_dir=runs/compare] [--out=docs/results]

Every arm runs with the same seeds, step budget and held-out evaluation (the base config's), one
run directory each under --runs_dir; a complete run (its evaluations.json holds the final eval) is
skipped and an interrupted one resumes from its newest checkpoint, so the command can be rerun
after a crash. The report in --out: compare.md (the per-domain table, mean ± std over seeds),
accuracy_curves.png (per-domain pass@1 over steps) and interference.png (the D×D cosines of the
per-domain policy gradients at the first and last step, mixed GRPO and MCPO).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/multi_domain.py:compare", "Base run config file[:preset].")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds; every arm runs each of them.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs/compare", "One run directory per arm and seed goes here.")
_OUT = flags.DEFINE_string("out", "docs/results", "Where compare.md and the figures are written.")
_ARMS = flags.DEFINE_list("arms", [], "Run only these arms (default: all); see `arms()` for the names.")


@dataclass(frozen=True)
class Arm:
  name: str  # e.g. "mcpo", "grpo-single-gcd"
  label: str  # the table's row label
  configure: Callable[[ml_collections.ConfigDict], None]  # edits a copy of the base config in place
  domain: str | None = None  # single-domain arms: the one domain they train and evaluate on


def _set(**fields) -> Callable[[ml_collections.ConfigDict], None]:
  def configure(config):
    for dotted, value in fields.items():
      *parents, leaf = dotted.split("__")
      node = config
      for part in parents:
        node = node[part]
      node[leaf] = value
  return configure


def _single_domain(domain: str) -> Callable[[ml_collections.ConfigDict], None]:
  def configure(config):
    config.algorithm = "grpo"
    config.data.domains = {domain: config.data.domains[domain].to_dict()}
    config.objective.transfer = {}
  return configure


def arms(domains: Sequence[str]) -> list[Arm]:
  """The comparison: a GRPO specialist per domain, mixed GRPO, MCPO, and four MCPO ablations."""
  return [
      *[Arm(f"grpo-single-{d}", "GRPO, single-domain (one run per domain)", _single_domain(d), d) for d in domains],
      Arm("grpo-mixed", "GRPO, mixed domains", _set(algorithm="grpo")),
      Arm("mcpo", "MCPO", _set(algorithm="mcpo")),
      Arm("mcpo-no-cross", "MCPO without the cross-domain term (λ_cross = 0)",
          _set(algorithm="mcpo", objective__lambda_cross=0.0)),
      Arm("mcpo-no-in", "MCPO without the in-domain term (λ_in = 0)", _set(algorithm="mcpo", objective__lambda_in=0.0)),
      Arm("mcpo-head-only", "MCPO, contrastive gradient to the head only (repr_grad = head)",
          _set(algorithm="mcpo", objective__repr_grad="head")),
      Arm("mcpo-reward-coupling", "MCPO as a reward bonus (coupling = reward)",
          _set(algorithm="mcpo", objective__coupling="reward")),
  ]


def run_config(base: ml_collections.ConfigDict, arm: Arm, seed: int, runs_dir: str) -> ml_collections.ConfigDict:
  config = copy.deepcopy(base)
  arm.configure(config)
  config.seed = seed
  config.workdir = f"{runs_dir}/{arm.name}/seed{seed}"
  config.resume = "auto"
  config.eval.at_start = config.eval.at_end = True
  return config


def is_complete(workdir: Path) -> bool:
  path = workdir / "evaluations.json"
  return path.exists() and "end" in json.loads(path.read_text())


def read_run(workdir: Path) -> dict:
  """{"curve": {step: {metric: value}}, "cosines": [(step, D×D)]} from a finished run directory."""
  curve = {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in sorted((workdir / "eval").glob("step_*.json"))}
  from mcpo_jax.metrics import read_metrics
  cosines = [(s, np.asarray(r["diag/grad_cosine"])) for s, r in sorted(read_metrics(workdir).items())
             if "diag/grad_cosine" in r]
  return {"curve": curve, "cosines": cosines}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, float)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: dict[tuple[str, int], dict], arm_list: Sequence[Arm], domains: Sequence[str],
              seeds: Sequence[int], metric: str = "pass@1") -> dict[str, dict[str, list[float]]]:
  """{row label: {domain or "average": [value per seed]}} of the final held-out evaluation."""
  final = lambda run: run["curve"][max(run["curve"])]
  # Every arm starts from the same weights and evaluates the same prompts: the mixed runs' step-0 eval.
  rows = {"start (the initial policy)": {d: [runs[("grpo-mixed", s)]["curve"][0][f"eval/{d}/{metric}"] for s in seeds]
                                         for d in domains}}
  for arm in arm_list:
    row = rows.setdefault(arm.label, {d: [] for d in domains})
    for seed in seeds:
      evaluation = final(runs[(arm.name, seed)])
      for d in ([arm.domain] if arm.domain else domains):
        row[d].append(evaluation[f"eval/{d}/{metric}"])
  for row in rows.values():
    row["average"] = [float(np.mean([row[d][i] for d in domains])) for i in range(len(seeds))]
  return rows


def format_report(rows: dict[str, dict[str, list[float]]], domains: Sequence[str], seeds: Sequence[int]) -> str:
  columns = [*domains, "average"]
  lines = ["| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for label, row in rows.items():
    cells = []
    for column in columns:
      mean, std = _mean_std(row[column])
      cells.append(f"{mean:.3f} ± {std:.3f}")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"Held-out test pass@1 (greedy) after the last step: mean ± sample std over seeds {list(seeds)}.")
  return "\n".join(lines)


def verdict(rows: dict[str, dict[str, list[float]]], domains: Sequence[str]) -> str:
  """MCPO against mixed GRPO per domain, each difference next to the seed spread."""
  mcpo, mixed = rows["MCPO"], rows["GRPO, mixed domains"]
  parts = []
  for column in [*domains, "average"]:
    diff = np.asarray(mcpo[column]) - np.asarray(mixed[column])  # paired by seed
    mean, std = _mean_std(diff)
    spread = max(_mean_std(mcpo[column])[1], _mean_std(mixed[column])[1])
    if abs(mean) <= max(std, spread):
      word = "no difference beyond the seed spread"
    else:
      word = "MCPO better" if mean > 0 else "mixed GRPO better"
    parts.append(f"- {column}: MCPO − mixed GRPO = {mean:+.3f} (paired over seeds, std {std:.3f}; seed spread "
                 f"{spread:.3f}): {word}.")
  return "\n".join(parts)


def plot_curves(runs, arm_list, domains, seeds, path: Path, metric: str = "pass@1") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False)
  for ax, domain in zip(axes[0], domains):
    for arm in arm_list:
      if arm.domain not in (None, domain):
        continue
      steps = sorted(runs[(arm.name, seeds[0])]["curve"])
      values = np.array([[runs[(arm.name, s)]["curve"][t][f"eval/{domain}/{metric}"] for t in steps] for s in seeds])
      label = "GRPO single-domain" if arm.domain else arm.name
      line, = ax.plot(steps, values.mean(0), marker="o", ms=3, label=label)
      ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set_title(domain)
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"held-out {metric}")
    ax.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=7, loc="best")
  figure.suptitle(f"per-domain accuracy; line = mean over seeds {list(seeds)}, band = min–max")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def plot_interference(runs, domains, seeds, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(2, 2, figsize=(8, 7))
  image = None
  for row, arm in enumerate(("grpo-mixed", "mcpo")):
    for col, which in enumerate(("first", "last")):
      index = 0 if which == "first" else -1
      matrices = [runs[(arm, s)]["cosines"][index] for s in seeds if runs[(arm, s)]["cosines"]]
      ax = axes[row][col]
      if not matrices:
        ax.set_axis_off()
        continue
      step, mean = matrices[0][0], np.mean([m for _, m in matrices], axis=0)
      image = ax.imshow(mean, vmin=-1, vmax=1, cmap="RdBu")
      for i in range(len(domains)):
        for j in range(len(domains)):
          ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=9)
      ax.set_xticks(range(len(domains)), domains, rotation=30)
      ax.set_yticks(range(len(domains)), domains)
      ax.set_title(f"{arm}, step {step} ({which})", fontsize=10)
  if image is not None:  # none when the runs took no diagnostics (diag_every = 0)
    figure.colorbar(image, ax=axes, shrink=0.8, label="cosine of per-domain policy gradients")
  figure.suptitle(f"gradient interference, mean over seeds {list(seeds)}")
  figure.savefig(path, dpi=120)
  plt.close(figure)


def _commit() -> str:
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def compare(base: ml_collections.ConfigDict, seeds: Sequence[int], runs_dir: str, out: str,
            only: Sequence[str] = (), command: str = "") -> Path:
  """Runs every missing (arm, seed), then writes the report; returns the path of compare.md."""
  from mcpo_jax.data.domains import parse_domains
  from mcpo_jax.rl_loop import train

  domains = [d.name for d in parse_domains(base.data.domains)]
  arm_list = arms(domains)
  unknown = set(only) - {a.name for a in arm_list}
  if unknown:
    raise ValueError(f"--arms: unknown {sorted(unknown)}; the arms are {', '.join(a.name for a in arm_list)}.")
  todo = [(arm, seed) for arm in arm_list for seed in seeds if not only or arm.name in only]
  for i, (arm, seed) in enumerate(todo):
    config = run_config(base, arm, seed, runs_dir)
    if is_complete(Path(config.workdir)):
      print(f"[{i + 1}/{len(todo)}] {arm.name} seed {seed}: complete, skipped")
      continue
    print(f"[{i + 1}/{len(todo)}] {arm.name} seed {seed} -> {config.workdir}", flush=True)
    train(config)
  if only:
    return Path(out)

  runs = {(arm.name, seed): read_run(Path(run_config(base, arm, seed, runs_dir).workdir))
          for arm in arm_list for seed in seeds}
  rows = summarize(runs, arm_list, domains, seeds)
  out_dir = Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  plot_curves(runs, arm_list, domains, seeds, out_dir / "accuracy_curves.png")
  plot_interference(runs, domains, seeds, out_dir / "interference.png")
  (out_dir / "compare.json").write_text(json.dumps(rows, indent=2))
  report = "\n\n".join([
      "# Single-domain GRPO vs mixed GRPO vs MCPO",
      f"Command: `{command}`\n\nCommit: `{_commit()}`. Base config: {base.model.name}, {base.train.steps} RL steps "
      f"of {base.data.prompts_per_step} prompts × {base.rollout.group_size} rollouts, "
      f"{base.rollout.max_new_tokens} new tokens, learning rate {base.optim.learning_rate}; evaluation: "
      f"{base.eval.prompts_per_domain} held-out '{base.eval.split}' prompts per domain.",
      format_report(rows, domains, seeds),
      "## MCPO against mixed GRPO\n\n" + verdict(rows, domains),
      "![per-domain accuracy](accuracy_curves.png)\n\n![gradient interference](interference.png)",
  ])
  (out_dir / "compare.md").write_text(report + "\n")
  print(report)
  return out_dir / "compare.md"


def main(argv) -> None:
  del argv
  from mcpo_jax import config as config_lib
  base = config_lib.validate(_CONFIG.value)
  command = " ".join(["python -m mcpo_jax.experiments.compare", *sys.argv[1:]])
  try:
    compare(base, [int(s) for s in _SEEDS.value], _RUNS_DIR.value, _OUT.value, _ARMS.value, command)
  except (config_lib.ConfigError, ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)
