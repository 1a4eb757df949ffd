"""Metric sinks: metrics.jsonl (always), TensorBoard event files, an optional Weights & Biases run, and a
console progress line.

Only process 0 writes. Values are plain floats by the time they arrive here (the loop gathers
and converts device arrays first), so no sink ever touches a non-addressable array.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath
from tensorboardX import SummaryWriter


def tensorboard_tag(name: str) -> str:
  """TensorBoard allows [A-Za-z0-9_.-/] in tags: "eval/mean/pass@1" -> "eval/mean/pass_1" (as it would
  rename it itself, with a log line per name at every write)."""
  return re.sub(r"[^A-Za-z0-9_.\-/]", "_", name)


def _row_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError):
    return None


def _scalar(value: Any) -> float | None:
  if isinstance(value, (int, float, np.number)) or (isinstance(value, np.ndarray) and value.ndim == 0):
    return float(value)
  return None


class MetricsWriter:
  """Writes each step's flat {name: value} dict to metrics.jsonl and TensorBoard (scalars + images).

  A run that starts at step `start_step` (None: append to whatever is there) supersedes what an earlier
  try logged after it, so that a step re-trained after a crash appears once: metrics.jsonl loses those
  rows, and the new event file opens with TensorBoard's purge marker, which hides the earlier files'
  events from that step on. Rows at `start_step` belong to the restored state and stay, except at 0.
  """

  def __init__(self, workdir: str | Path, *, tensorboard: bool = True, start_step: int | None = None,
               wandb_project: str = "", config_json: str = "{}"):
    self.enabled = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._tb = self._wandb = None
    if self.enabled and wandb_project:
      self._wandb = _wandb_run(workdir, wandb_project, json.loads(config_json))
    if self.enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      first_superseded = None if start_step is None else start_step + 1 if start_step > 0 else 0
      if self.path.exists() and first_superseded is not None:
        kept = [line for line in self.path.read_text().splitlines(keepends=True)
                if (_row_step(line) if line.endswith("\n") else None) is not None  # a line torn by a kill: dropped
                and _row_step(line) < first_superseded]
        partial = self.path.parent / (self.path.name + ".tmp")
        partial.write_text("".join(kept))
        partial.replace(self.path)  # atomic: a crash here leaves either the old file or the new one
      if tensorboard:
        self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"), purge_step=first_superseded)

  @property
  def wandb_run(self):
    """The Weights & Biases run (None when metrics.wandb_project is empty or on processes other than 0)."""
    return self._wandb

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    for name, value in metrics.items():
      scalar = _scalar(value)
      if scalar is not None:
        record[name] = scalar if math.isfinite(scalar) else str(scalar)
        if self._tb is not None:
          self._tb.add_scalar(tensorboard_tag(name), scalar, step)
      elif isinstance(value, (list, np.ndarray)):  # e.g. the D×D gradient-cosine matrix
        record[name] = np.asarray(value, float).round(6).tolist()
    if self._wandb is not None:
      self._wandb.log({"step": int(step), **_wandb_values(record)})
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _wandb_run(workdir, project: str, config: dict):
  """A W&B run in workdir/wandb whose id is the workdir's, so that a resumed run continues it."""
  import wandb
  directory = epath.Path(workdir)
  run_id = re.sub(r"[^A-Za-z0-9_-]", "-", str(directory).strip("/"))[-64:]
  run = wandb.init(project=project, dir=str(directory), id=run_id, name=directory.name, config=config,
                   resume="allow")
  # Each write is its own W&B row on the x-axis "step": a step's training row and its evaluation are two
  # writes, and a re-trained step after a resume goes back in step, which W&B's own step would drop.
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  return run


def _wandb_values(record: dict[str, Any]) -> dict[str, Any]:
  """One step's values for W&B: scalars as they are; a matrix (the D×D gradient cosines) as a table; the
  per-domain evaluation also as one table (domain × metric)."""
  import wandb
  values = {}
  for name, value in record.items():
    if name == "step":
      continue
    values[name] = wandb.Table(data=value, columns=[str(i) for i in range(len(value))]) if isinstance(value, list) \
        else value
  evals = {}  # {domain: {metric: value}} from "eval/<domain>/<metric>"
  for name, value in record.items():
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "eval" and isinstance(value, float):
      evals.setdefault(parts[1], {})[parts[2]] = value
  if evals:
    metrics = sorted({metric for row in evals.values() for metric in row})
    values["eval/table"] = wandb.Table(columns=["domain", *metrics],
                                       data=[[domain, *(row.get(m) for m in metrics)] for domain, row in evals.items()])
  return values


def read_metrics(workdir: str | Path) -> dict[int, dict[str, Any]]:
  """metrics.jsonl as {step: every metric logged at that step} (the training row and any eval row merged)."""
  merged: dict[int, dict[str, Any]] = {}
  for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    merged.setdefault(record["step"], {}).update(record)
  return merged


class Progress:
  """One console line per step: step/total, rate, ETA, a few chosen metrics, and where the step's time went."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stdout):
    self.total, self.start_step, self.stream = total_steps, start_step, stream
    self.started = time.perf_counter()
    self.enabled = jax.process_index() == 0

  def update(self, step: int, metrics: dict[str, Any], keys: tuple[str, ...]) -> None:
    if not self.enabled:
      return
    done = step - self.start_step
    elapsed = time.perf_counter() - self.started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
    phases = [f"{name} {metrics[f'{name}_s']:.1f}s" for name in ("rollout", "reward", "update") if f"{name}_s" in metrics]
    split = f" | {' / '.join(phases)}" if phases else ""
    print(f"step {step}/{self.total} | {rate * 60:.2f} steps/min | ETA {_duration(eta)} | {shown}{split}",
          file=self.stream, flush=True)


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
