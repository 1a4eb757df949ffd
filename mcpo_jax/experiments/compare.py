"""Single-domain GRPO vs mixed-domain GRPO vs MCPO and its ablations, per domain, over seeds.

  python -m mcpo_jax.experiments.compare --config=configs/multi_domain.py[:preset] \
      [--config.<field>=<value> ...] [--seeds=0,1] [--runs_dir=runs/compare] [--out=docs/results]

Every arm runs with the same seeds, step budget and held-out evaluation (the base config's), one
run directory each under --runs_dir; a complete run (its evaluations.json holds the final eval) is
skipped and an interrupted one resumes from its newest checkpoint, so the command can be rerun
after a crash. The statistics use the runs' per-prompt eval records: per domain and on average,
accuracy with a 95% CI and each arm − mixed GRPO paired by seed and prompt with a 95% CI (a
two-way cluster bootstrap over seeds and prompts, stats.py), a verdict only where the CI excludes
0, the constant-answer baseline and a collapse flag for arms at or below it. The report in --out:
compare.md, compare.json (every number of it), accuracy_curves.png (per-domain pass@1 over steps)
and interference.png (the D×D cosines of the per-domain policy gradients, mixed GRPO and MCPO).
`--grid=defaults` runs the sweep of MCPO's knobs instead (sweep.md, sweep.json, sweep_*.png), and
`--grid=learning_rate` mixed GRPO at ½, 1 and 2 × the learning rate (learning_rate.md, ...).
What the report reads of each finished run (its evaluations and diagnostics, no checkpoints) is kept in
--out/runs/<runs_dir's name>/<arm>/seed<S>, shared by every report over that runs_dir: a run found there
counts as complete, so the same command adds seeds or arms later, on another machine, training only the
new runs.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags

from mcpo_jax.experiments.stats import cluster_bootstrap, verdict
from mcpo_jax.flag_errors import define_config, parse_flags

METHOD = (
    "How to read it. Accuracy: the mean over seeds and held-out prompts of the final evaluation, with a 95% "
    "interval from a two-way cluster bootstrap (seeds and prompts resampled independently; 2000 draws). "
    "Differences: arm − mixed GRPO on the same prompt with the same seed, with the same bootstrap. A difference "
    "is called better or worse only when its interval excludes 0. The constant-answer baseline is the best "
    "accuracy one fixed answer gets on that eval set; an arm at or below it is flagged **collapsed** and never "
    "called better. The smallest detectable difference is 2.8 bootstrap standard errors: a true difference that "
    "large is found 80% of the time by this 5% test. With few seeds, a run-wide shift of one seed is estimated "
    "from few values (see mcpo_jax/experiments/stats.py).")

_CONFIG = define_config("configs/multi_domain.py:compare", "Base run config file[:preset].")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds; every arm runs each of them.")
_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs/compare", "One run directory per arm and seed goes here.")
_OUT = flags.DEFINE_string("out", "docs/results", "Where compare.md and the figures are written.")
_ARMS = flags.DEFINE_list("arms", [], "Run and report only these arms, grpo-mixed among them (default: all); see "
                          "`arms()` for the names.")
_NAME = flags.DEFINE_string("name", "", "The report's file stem in --out (default: the grid's: compare, sweep, learning_rate).")


@dataclass(frozen=True)
class Arm:
  name: str  # e.g. "mcpo", "grpo-single-gcd"
  label: str  # the table's row label
  configure: Callable[[ml_collections.ConfigDict], None]  # edits a copy of the base config in place
  domain: str | None = None  # single-domain arms: the one domain they train on (they evaluate on every domain)


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
  """GRPO trained on `domain` alone; the other domains stay, at weight 0, so they are evaluated (transfer)."""
  def configure(config):
    config.algorithm = "grpo"
    for name in config.data.domains:
      if name != domain:
        config.data.domains[name] = {**config.data.domains[name].to_dict(), "weight": 0.0}
    config.objective.transfer = {}
  return configure


def _reward_after_head_warmup(config):
  config.algorithm, config.objective.coupling = "mcpo", "reward"
  config.objective.head_warmup_steps = min(3, config.train.steps - 1)  # a shorter (test) run keeps an LLM step


# The validation sweep's best MCPO variant (docs/results/sweep.md), an arm of the comparison too.
REWARD_WARMUP = Arm("mcpo-reward-warmup", "MCPO as a reward bonus after a 3-step head warm-up",
                    _reward_after_head_warmup)


def arms(domains: Sequence[str]) -> list[Arm]:
  """The comparison: a GRPO specialist per domain (evaluated on every domain: the transfer probe), mixed GRPO,
  MCPO, and four MCPO ablations."""
  return [
      *[Arm(f"grpo-single-{d}", f"GRPO on {d} only", _single_domain(d), d) for d in domains],
      Arm("grpo-mixed", "GRPO, mixed domains", _set(algorithm="grpo")),
      Arm("mcpo", "MCPO", _set(algorithm="mcpo")),
      Arm("mcpo-no-cross", "MCPO without the cross-domain term (λ_cross = 0)",
          _set(algorithm="mcpo", objective__lambda_cross=0.0)),
      Arm("mcpo-no-in", "MCPO without the in-domain term (λ_in = 0)", _set(algorithm="mcpo", objective__lambda_in=0.0)),
      Arm("mcpo-head-only", "MCPO, contrastive gradient to the head only (repr_grad = head)",
          _set(algorithm="mcpo", objective__repr_grad="head")),
      REWARD_WARMUP,
  ]


def sweep_arms(domains: Sequence[str]) -> list[Arm]:
  """The validation sweep that chose MCPO's defaults (run it with --grid=defaults on the validation split):
  mixed GRPO as the reference, the shipped MCPO, and one knob changed at a time from it."""
  del domains
  return [
      Arm("grpo-mixed", MIXED, _set(algorithm="grpo")),
      Arm("mcpo", "MCPO", _set(algorithm="mcpo")),
      Arm("mcpo-per-term", "MCPO, per-term denominators", _set(algorithm="mcpo", objective__denominator="per_term")),
      REWARD_WARMUP,
  ]


def _scaled_learning_rate(factor: float) -> Callable[[ml_collections.ConfigDict], None]:
  def configure(config):
    config.algorithm = "grpo"
    config.optim.learning_rate *= factor
  return configure


def learning_rate_arms(domains: Sequence[str]) -> list[Arm]:
  """Pilot 1, the learning-rate check (run it with --grid=learning_rate on the validation split): mixed GRPO at
  the base config's learning rate (the reference), at half of it and at twice it. The rule: the largest rate
  whose most-common-answer share stays below the start's + 0.2 (the report's answer-share table)."""
  del domains
  return [Arm("grpo-mixed", MIXED, _set(algorithm="grpo")),
          *[Arm(f"grpo-mixed-lr-{factor}x", f"GRPO, mixed domains, learning rate × {factor}",
                _scaled_learning_rate(factor)) for factor in (0.5, 2)]]


@dataclass(frozen=True)
class Grid:
  """What --grid=<name> runs: its arms, the stem of its report's files in --out, and the report's title
  (None: the arms' labels joined by "vs")."""
  arms: Callable[[Sequence[str]], list[Arm]]
  stem: str
  title: str | None = None


GRIDS = {
    "comparison": Grid(arms, "compare"),
    "defaults": Grid(sweep_arms, "sweep", "MCPO's knobs, one at a time, against mixed GRPO (the defaults sweep)"),
    "learning_rate": Grid(learning_rate_arms, "learning_rate", "Mixed GRPO at three learning rates (pilot 1)"),
}
_GRID = flags.DEFINE_enum("grid", "comparison", list(GRIDS),
                          "comparison: the methods (compare.md); defaults: the sweep of MCPO's knobs (sweep.md); "
                          "learning_rate: mixed GRPO at ½, 1 and 2 × the learning rate (learning_rate.md).")


def run_config(base: ml_collections.ConfigDict, arm: Arm, seed: int, runs_dir: str,
               start_eval: bool = False) -> ml_collections.ConfigDict:
  """One arm × seed's run config; `start_eval`: evaluate the initial policy too (the report's start row)."""
  config = copy.deepcopy(base)
  arm.configure(config)
  config.seed = seed
  config.workdir = f"{runs_dir}/{arm.name}/seed{seed}"
  config.resume = "auto"
  config.eval.at_start, config.eval.at_end = start_eval, True
  return config


def keep_run(workdir: Path, kept: Path) -> None:
  """Copies what the report reads of a finished run to `kept`, which read_run then reads like the run: its
  evaluations, their per-prompt records and the diagnostics rows of its metrics (no checkpoints; ~100 KB)."""
  (kept / "eval").mkdir(parents=True, exist_ok=True)
  for path in (workdir / "eval").glob("step_*"):
    shutil.copyfile(path, kept / "eval" / path.name)
  shutil.copyfile(workdir / "evaluations.json", kept / "evaluations.json")
  rows = [line for line in (workdir / "metrics.jsonl").read_text().splitlines() if '"diag/grad_cosine"' in line]
  (kept / "metrics.jsonl").write_text("".join(row + "\n" for row in rows))


def is_complete(workdir: Path) -> bool:
  path = workdir / "evaluations.json"
  return path.exists() and "end" in json.loads(path.read_text())


def read_run(workdir: Path) -> dict:
  """{"curve": {step: {metric: value}}, "records": {step: [per-prompt record]}, "cosines": [(step, D×D)]}."""
  from mcpo_jax.evaluation import per_prompt_path, read_per_prompt
  from mcpo_jax.metrics import read_metrics
  curve = {int(p.name.split("_")[1].split(".")[0]): json.loads(p.read_text())
           for p in sorted((workdir / "eval").glob("step_*[0-9].json"))}
  records = {step: read_per_prompt(str(workdir), step) for step in curve if per_prompt_path(workdir, step).exists()}
  cosines = [(s, np.asarray(r["diag/grad_cosine"])) for s, r in sorted(read_metrics(workdir).items())
             if "diag/grad_cosine" in r]
  return {"curve": curve, "records": records, "cosines": cosines}


START = "start (the initial policy)"
MIXED = "GRPO, mixed domains"
SPECIALISTS = "GRPO, single-domain (each domain's own run)"


def _with_specialists(rows: dict[str, dict], arm_list: Sequence[Arm], domains: Sequence[str]) -> dict[str, dict]:
  """`rows` ({arm label: {domain: value}}) led by the specialists' row, each domain's cell from the run trained
  on it alone, when every domain has its single-domain arm."""
  own = {arm.domain: rows[arm.label][arm.domain] for arm in arm_list if arm.domain and arm.domain in rows[arm.label]}
  return {SPECIALISTS: {d: own[d] for d in domains}, **rows} if set(own) == set(domains) else rows


def score_tables(runs: dict[tuple[str, int], dict], arm_list: Sequence[Arm], domains: Sequence[str],
                 seeds: Sequence[int], metric: str) -> dict[str, dict[str, np.ndarray]]:
  """{row label: {domain: [S, P] per-(seed, prompt) score}} of the final evaluation (the start row: [1, P], step 0
  of mixed GRPO's first seed; the specialists' row when every domain has a single-domain arm).

  metric "pass@1" scores the greedy answer (0/1), "mean@k" the share of the k samples that are right.
  Prompts are in the order of mixed GRPO's first seed, matched by domain, eval index and content hash,
  so every table's column p is the same question.
  """
  score = ((lambda r: float(r["greedy_correct"])) if metric == "pass@1" else
           (lambda r: float(np.mean(r["sampled_correct"]))))
  reference = runs[("grpo-mixed", seeds[0])]["records"][0]
  order = {d: [(r["index"], r["prompt_hash"]) for r in reference if r["domain"] == d] for d in domains}

  def table(run: dict, step: int, domain: str) -> list[float]:
    if step not in run["records"]:
      raise FileNotFoundError(f"a run has no per-prompt records for step {step}; rerun it with this version "
                              "(delete its run directory).")
    by_key = {(r["index"], r["prompt_hash"]): r for r in run["records"][step] if r["domain"] == domain}
    if set(by_key) != set(order[domain]):
      raise ValueError(f"runs evaluated different {domain!r} prompts; every arm must use the same eval set.")
    return [score(by_key[key]) for key in order[domain]]

  final = lambda run: max(run["curve"])
  rows = {arm.label: {d: np.array([table(runs[(arm.name, s)], final(runs[(arm.name, s)]), d) for s in seeds])
                      for d in domains} for arm in arm_list}  # [S, P]
  start = {d: np.array([table(runs[("grpo-mixed", seeds[0])], 0, d)]) for d in domains}  # [1, P]
  return {START: start, **_with_specialists(rows, arm_list, domains)}


def statistics(tables: dict[str, dict[str, np.ndarray]], baselines: dict[str, float], *,
               pairs: Sequence[tuple[str, str]] = (), draws: int = 2000) -> dict[str, dict]:
  """Per row: accuracy intervals with collapse flags; per arm: the paired difference to mixed GRPO and its verdict;
  per (row, other row) of `pairs`: their paired difference ("paired", keyed "row − other row").

  An arm whose accuracy is at or below the constant-answer baseline of a column is collapsed there, and
  its difference is never called better. The bootstrap seed is fixed, so the report is reproducible.
  """
  columns = list(next(iter(tables.values())))
  baseline = {**baselines, "average": float(np.mean([baselines[d] for d in columns]))} if baselines else {}
  result = {"accuracy": {}, "difference": {}, "paired": {}}

  def difference(label: str, other: str) -> dict[str, dict]:
    intervals = cluster_bootstrap({d: tables[label][d] - tables[other][d] for d in columns}, draws=draws)
    return {column: {**asdict(interval), "detectable": interval.detectable,
                     "verdict": verdict(interval, result["accuracy"][label][column]["collapsed"])}
            for column, interval in intervals.items()}

  for label, table in tables.items():
    intervals = cluster_bootstrap(table, draws=draws)
    result["accuracy"][label] = {
        column: {**asdict(interval), "collapsed": bool(column in baseline and interval.estimate <= baseline[column])}
        for column, interval in intervals.items()}
  result["difference"] = {label: difference(label, MIXED) for label in tables if label not in (START, MIXED)}
  result["paired"] = {f"{label} − {other}": difference(label, other) for label, other in pairs}
  return result


def _ci(entry: dict, signed: bool = False) -> str:
  number = "{:+.3f}" if signed else "{:.3f}"
  return f"{number.format(entry['estimate'])} [{number.format(entry['low'])}, {number.format(entry['high'])}]"


def _short(verdict_text: str) -> str:
  """The table cell's word: "better", "worse", "no difference detected" or "collapsed: <word>"."""
  word = verdict_text.rsplit(", CI", 1)[0]
  return word.replace(" (at or below the constant-answer baseline)", "")


def format_report(stats: dict[str, dict], metric: str, baselines: dict[str, float],
                  shares: dict[str, dict[str, float]], seeds: Sequence[int]) -> str:
  """Markdown: accuracy with 95% CIs and collapse flags, the baselines, and each arm − mixed GRPO with verdicts."""
  columns = list(next(iter(stats["accuracy"].values())))
  header = lambda first: [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  lines = [f"### {metric}: accuracy (95% CI over seeds {list(seeds)} and prompts)", "", *header("arm")]
  for label, row in stats["accuracy"].items():
    cells = [_ci(row[c]) + (" **collapsed**" if row[c]["collapsed"] else "") for c in columns]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  if baselines:
    average = {**baselines, "average": float(np.mean(list(baselines.values())))}
    lines.append("| constant-answer baseline (best single answer) | " +
                 " | ".join(f"{average[c]:.3f}" for c in columns) + " |")
  lines += ["", f"### {metric}: each arm − mixed GRPO, paired by seed and prompt", "", *header("arm − mixed GRPO")]
  for label, row in stats["difference"].items():
    lines.append(f"| {label} | " + " | ".join(f"{_ci(row[c], True)}: {_short(row[c]['verdict'])}"
                                              for c in columns) + " |")
  mcpo = stats["difference"].get("MCPO")
  if mcpo:
    lines.append("| smallest detectable difference (2.8 SE of MCPO − mixed GRPO: 80% power at 5%) | " +
                 " | ".join(f"{mcpo[c]['detectable']:.3f}" for c in columns) + " |")
    lines += ["", *[f"- {c}: MCPO − mixed GRPO = {mcpo[c]['estimate']:+.3f}: {mcpo[c]['verdict']}." for c in columns]]
  for label, row in stats["paired"].items():
    lines += ["", f"### {metric}: {label}, paired by seed and prompt", "", *header("difference"),
              f"| {label} | " + " | ".join(f"{_ci(row[c], True)}: {_short(row[c]['verdict'])}" for c in columns) + " |"]
  if shares and metric == "pass@1":
    lines += ["", "### Share of the most common greedy answer (mean over seeds; 1.0 = one answer to everything)", "",
              *header("arm")]
    for label, row in shares.items():
      lines.append(f"| {label} | " + " | ".join(f"{row[c]:.3f}" if c in row else "–" for c in columns) + " |")
  return "\n".join(lines)


def answer_shares(runs, arm_list: Sequence[Arm], domains: Sequence[str], seeds: Sequence[int]
                  ) -> dict[str, dict[str, float]]:
  """{row label: {domain or "average": mean over seeds of the most common greedy answer's share}}."""
  def share(run, step, domain):
    return run["curve"][step].get(f"eval/{domain}/top_answer_share")
  start = runs[("grpo-mixed", seeds[0])]
  def end_share(arm, domain):  # mean over seeds, or None when a run did not log it
    values = [share(runs[(arm.name, s)], max(runs[(arm.name, s)]["curve"]), domain) for s in seeds]
    return float(np.mean(values)) if all(v is not None for v in values) else None
  rows = {arm.label: {d: v for d in domains if (v := end_share(arm, d)) is not None} for arm in arm_list}
  rows = {START: {d: share(start, 0, d) for d in domains if share(start, 0, d) is not None},
          **_with_specialists(rows, arm_list, domains)}
  for row in rows.values():
    if row and len(row) == len(domains):
      row["average"] = float(np.mean(list(row.values())))
  return rows


def plot_curves(runs, arm_list, domains, seeds, path: Path, metric: str = "pass@1") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, axes = plt.subplots(1, len(domains), figsize=(4.5 * len(domains), 3.6), squeeze=False)
  for ax, domain in zip(axes[0], domains):
    for arm in arm_list:
      # Every arm starts at the one evaluation of the initial policy (mixed GRPO's first seed).
      start = runs[("grpo-mixed", seeds[0])]["curve"][0][f"eval/{domain}/{metric}"]
      curves = [runs[(arm.name, s)]["curve"] for s in seeds]
      steps = sorted(set.intersection(*(set(curve) for curve in curves)) - {0})
      values = np.array([[start] + [curve[t][f"eval/{domain}/{metric}"] for t in steps] for curve in curves])
      steps = [0, *steps]
      line, = ax.plot(steps, values.mean(0), marker="o", ms=3, label=arm.name)
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
      matrices = [runs[(arm, s)]["cosines"][index] for s in seeds if runs.get((arm, s), {}).get("cosines")]
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
            only: Sequence[str] = (), command: str = "", grid: str = "comparison", name: str = "") -> Path:
  """Runs every missing (arm, seed) of the grid, then writes the report; returns the path of <stem>.md."""
  from mcpo_jax.config import build
  from mcpo_jax.data.domains import parse_domains
  from mcpo_jax.evaluation import per_prompt_path
  from mcpo_jax.rl_loop import train

  commit = _commit()  # before this command writes anything: its own report files would read as uncommitted changes
  domains = [d.name for d in parse_domains(base.data.domains)]
  arm_list = GRIDS[grid].arms(domains)
  unknown = set(only) - {a.name for a in arm_list}
  if unknown:
    raise ValueError(f"--arms: unknown {sorted(unknown)}; the arms are {', '.join(a.name for a in arm_list)}.")
  if only:  # the grid and its report narrowed to these arms; mixed GRPO is every difference's reference
    if "grpo-mixed" not in only:
      raise ValueError("--arms must include grpo-mixed: the report's start row and differences are taken from it.")
    arm_list = [arm for arm in arm_list if arm.name in only]
  stem = name or GRIDS[grid].stem
  out_dir = Path(out)
  todo = [  # seed-major, so that a grid stopped part-way holds whole paired seeds
      (arm, seed) for seed in seeds for arm in arm_list]
  # Each finished run's evaluations are kept beside the report (out/runs/<runs_dir's name>/<arm>/seed<S>, one copy
  # for all reports over those runs), so a later command, on a machine without the runs, adds seeds or arms
  # without training the finished ones again.
  kept = lambda arm, seed: out_dir / "runs" / Path(runs_dir).name / arm.name / f"seed{seed}"
  workdir = lambda arm, seed: Path(run_config(base, arm, seed, runs_dir).workdir)
  # The start row is the step-0 evaluation of mixed GRPO's first seed; a finished run that did not make one (it was
  # not the first seed of its grid) cannot give it, and no later step should find that out after hours of training.
  mixed = next(arm for arm in arm_list if arm.name == "grpo-mixed")
  finished = [place(mixed, seeds[0]) for place in (workdir, kept) if is_complete(place(mixed, seeds[0]))]
  if finished and not per_prompt_path(finished[0], 0).exists():
    raise ValueError(f"--seeds={','.join(map(str, seeds))}: the report's start row is the step-0 evaluation of "
                     f"grpo-mixed seed {seeds[0]}, and its finished run in {finished[0]} has none (it was not the "
                     "first seed of its grid); put first a seed whose mixed-GRPO run has it, e.g. --seeds=0,...")
  for i, (arm, seed) in enumerate(todo):
    # The start row: mixed GRPO's first seed evaluates the initial policy, which every arm starts from.
    config = run_config(base, arm, seed, runs_dir, start_eval=(arm.name, seed) == ("grpo-mixed", seeds[0]))
    if is_complete(workdir(arm, seed)) or is_complete(kept(arm, seed)):
      print(f"[{i + 1}/{len(todo)}] {arm.name} seed {seed}: complete, skipped")
    else:
      print(f"[{i + 1}/{len(todo)}] {arm.name} seed {seed} -> {config.workdir}", flush=True)
      train(build(config))
    if is_complete(workdir(arm, seed)):
      keep_run(workdir(arm, seed), kept(arm, seed))

  runs = {(arm.name, seed): read_run(workdir(arm, seed) if is_complete(workdir(arm, seed)) else kept(arm, seed))
          for arm in arm_list for seed in seeds}
  end = runs[("grpo-mixed", seeds[0])]["curve"]
  end = end[max(end)]
  baselines = {d: end[f"eval/{d}/constant_baseline"] for d in domains if f"eval/{d}/constant_baseline" in end}
  metrics = ["pass@1", *([f"mean@{base.eval.k}"] if base.eval.k > 0 else [])]
  # MCPO against each single-domain arm directly: does MCPO carry a format's training to the others further?
  pairs = [("MCPO", arm.label) for arm in arm_list if arm.domain] if any(a.name == "mcpo" for a in arm_list) else []
  stats = {metric: statistics(score_tables(runs, arm_list, domains, seeds, metric), baselines, pairs=pairs)
           for metric in metrics}
  shares = answer_shares(runs, arm_list, domains, seeds)
  out_dir.mkdir(parents=True, exist_ok=True)
  prefix = "" if stem == "compare" else f"{stem}_"
  plot_curves(runs, arm_list, domains, seeds, out_dir / f"{prefix}accuracy_curves.png")
  plot_interference(runs, domains, seeds, out_dir / f"{prefix}interference.png")
  (out_dir / f"{stem}.json").write_text(json.dumps(
      {"seeds": list(seeds), "constant_baseline": baselines, "top_answer_share": shares, "metrics": stats}, indent=2))
  report = "\n\n".join([
      "# " + (GRIDS[grid].title or " vs ".join(dict.fromkeys(arm.label for arm in arm_list))),
      f"Command: `{command}`\n\nCommit: `{commit}`. Base config: {base.model.name}, {base.train.steps} RL steps "
      f"of {base.data.prompts_per_step} prompts × {base.rollout.group_size} rollouts, "
      f"{base.rollout.max_new_tokens} new tokens, learning rate {base.optim.learning_rate}; evaluation: "
      f"{base.eval.prompts_per_domain} held-out '{base.eval.split}' prompts per domain, greedy pass@1"
      + (f" and mean@{base.eval.k} (k samples at temperature {base.rollout.temperature})" if base.eval.k > 0 else "")
      + ".",
      METHOD,
      *[format_report(stats[metric], metric, baselines, shares, seeds) for metric in metrics],
      f"![per-domain accuracy]({prefix}accuracy_curves.png)\n\n![gradient interference]({prefix}interference.png)",
  ])
  (out_dir / f"{stem}.md").write_text(report + "\n")
  print(report)
  return out_dir / f"{stem}.md"


def main(argv) -> None:
  del argv
  from mcpo_jax.console import quiet_libraries
  quiet_libraries()
  from mcpo_jax import config as config_lib
  base = _CONFIG.value
  command = " ".join(["python -m mcpo_jax.experiments.compare", *sys.argv[1:]])
  try:
    config_lib.build(base)  # every arm's config is built (and checked) again before it runs
    compare(base, [int(s) for s in _SEEDS.value], _RUNS_DIR.value, _OUT.value, _ARMS.value, command, _GRID.value,
            _NAME.value)
  except (config_lib.ConfigError, ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
