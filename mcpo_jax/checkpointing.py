"""Orbax checkpoints of the train state plus a JSON "extra" item (data-iterator state, the run's config),
the rules that keep a resume from losing a run, and preemption.

Keeps the newest `keep_last` checkpoints and the `keep_best` best by an eval metric; saves are
asynchronous. Resuming never loses a run:
- a checkpoint written with a different config (the `PINNED` fields) or a different state layout is
  refused with one error and nothing in the workdir is touched: incompatibility is not corruption;
- a checkpoint whose data cannot be read is moved to checkpoints/corrupt/<step> (kept for inspection,
  and out of the way of a later save of that step) and the one before it is restored;
- `resume=none` on a workdir that holds a run refuses unless `overwrite`, which moves the old run aside.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

# Config fields a checkpoint cannot be resumed under once changed: they fix the state's shapes (model,
# proj_dim, LoRA) or what the run optimises and on which data. Everything else (steps, eval, mesh,
# memory knobs, learning rate) may change on resume.
PINNED = ("algorithm", "seed", "model.name", "model.tokenizer", "model.param_dtype", "model.lora.rank",
          "model.lora.alpha", "model.lora.targets", "objective",
          "data.domains", "data.prompts_per_step", "data.max_prompt_tokens", "data.dynamic_sampling",
          "rewards.mask_truncated", "rollout.group_size")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run saved its last completed step; rerun the command to continue


class ResumeError(ValueError):
  """The workdir cannot take this run: it cannot be written, or its checkpoints cannot be continued (or
  overwritten) under this config."""


class Preempted(Exception):
  """SIGTERM / SIGINT arrived and the last completed step (`step`; 0: none yet, nothing to save) is saved."""

  def __init__(self, step: int, directory: str):
    saved = f"checkpoint of step {step} saved in {directory}" if step else "no step had completed, nothing saved"
    super().__init__(f"preempted: {saved}; rerun the same command to resume")
    self.step = step


def _get(tree: dict, dotted: str) -> Any:
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return KeyError  # a field this config (or the checkpoint's, written by older code) does not have
    tree = tree[part]
  return tree


def _differences(field: str, old: Any, new: Any) -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    return [line for key in sorted(old.keys() | new.keys(), key=str)
            for line in _differences(f"{field}.{key}", old.get(key, KeyError), new.get(key, KeyError))]
  if json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str):
    return []
  short = lambda value: ("absent" if value is KeyError else
                         text if len(text := json.dumps(value, sort_keys=True)) <= 80 else text[:77] + "...")
  return [f"{field}={short(old)} in the checkpoint, {short(new)} now"]


def config_mismatches(saved: dict, current: dict) -> list[str]:
  """'field=<saved> in the checkpoint, <current> now' for each leaf of the PINNED fields that differs.

  A PINNED field that one side lacks altogether (a config written by older code) is not compared.
  """
  return [line for field in PINNED if KeyError not in (old := _get(saved, field), new := _get(current, field))
          for line in _differences(field, old, new)]


def layout_mismatches(saved: Any, abstract_state: Any) -> list[str]:
  """Arrays whose presence, shape or dtype differ between a checkpoint's metadata and the restore target."""
  old, new = ocp.tree.to_flat_dict(saved, sep="/"), ocp.tree.to_flat_dict(abstract_state, sep="/")
  out = [f"{name}: only in the checkpoint" for name in sorted(old.keys() - new.keys())]
  out += [f"{name}: not in the checkpoint" for name in sorted(new.keys() - old.keys())]
  for name in sorted(old.keys() & new.keys()):
    before, after = (tuple(old[name].shape), str(old[name].dtype)), (tuple(new[name].shape), str(new[name].dtype))
    if before != after:
      out.append(f"{name}: {before[1]}{list(before[0])} in the checkpoint, {after[1]}{list(after[0])} now")
  return out


def _ways_out(directory: epath.Path) -> str:
  return ("resume with the checkpoint's values, use a new --config.workdir, or start afresh here with "
          f"--config.resume=none --config.overwrite=true (which moves the old run in {directory.parent} aside).")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _is_closed_loop(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class _DuplicateReads(logging.Filter):
  """False (drop) for an asyncio record carrying "Event loop is closed", or a read error of a checkpoint
  under one of `directories` (paths without their scheme, as tensorstore's messages name them)."""

  def __init__(self):
    super().__init__()
    self.directories: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is None:
      return True
    text = str(error)
    read_error = "Error reading" in text and any(directory in text for directory in self.directories)
    return not (_is_closed_loop(error) or read_error)


_duplicate_reads = _DuplicateReads()


def _drop_duplicate_read_errors(directory: epath.Path) -> None:
  """Silences the echoes of a failed checkpoint read, which restore_latest already reports in one line.

  After a failed read, tensorstore's pending callbacks keep calling `call_soon_threadsafe` on the event
  loop orbax ran (and closed) for it; each raises "Event loop is closed" into sys.unraisablehook, hundreds of
  tracebacks, late and from other threads. The read's sibling tasks fail with the same read error, and
  asyncio logs each one, whenever it is garbage-collected, as "Task exception was never retrieved". The hook
  drops exactly the first kind; the asyncio filter drops both, the second only for reads under `directory`.
  """
  _duplicate_reads.directories.add(str(directory).split("://", 1)[-1])
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_callbacks", False):
    return

  def hook(unraisable) -> None:
    if not _is_closed_loop(unraisable.exc_value):
      previous(unraisable)

  hook.drops_closed_loop_callbacks = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(_duplicate_reads)


def _one_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


class Checkpointer:
  """Wraps an orbax CheckpointManager holding items "state" (a pytree) and "extra" (JSON)."""

  def __init__(self, directory: str | epath.PathLike, *, keep_last: int = 3, keep_best: int = 1,
               best_metric: str | None = None, best_mode: str = "max", async_save: bool = True):
    # orbax's tensorstore writer needs an absolute path: `runs/default` is resolved against the cwd.
    self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    _drop_duplicate_read_errors(self.directory)  # before any read: its echoes can come before its except clause
    policies = [preservation.LatestN(n=keep_last)]
    if best_metric and keep_best > 0:
      policies.append(preservation.BestN(get_metric_fn=lambda metrics: metrics[best_metric],
                                         reverse=best_mode == "min", n=keep_best,
                                         keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    # Explicit handlers, so that a step's metadata (shapes, dtypes) and its extra alone can be read.
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state: Any, extra: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    extra=ocp.args.JsonSave(extra)),
                      metrics=metrics, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def read_extra(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra

  def check_config(self, step: int, extra: dict[str, Any], config: ml_collections.ConfigDict) -> None:
    """Raises ResumeError when checkpoint `step` was written under different PINNED fields or past train.steps."""
    if "config" in extra:
      mismatches = config_mismatches(json.loads(extra["config"]), json.loads(config.to_json()))
      if mismatches:
        raise ResumeError(f"the checkpoint {self.directory}/{step} was written with a different config ("
                          f"{'; '.join(mismatches)}); {_ways_out(self.directory)}")
    if step > config.train.steps:
      raise ResumeError(f"the checkpoint {self.directory}/{step} is past --config.train.steps="
                        f"{config.train.steps}; raise train.steps to at least {step}, or {_ways_out(self.directory)}")

  def check_newest_config(self, config: ml_collections.ConfigDict) -> None:
    """check_config on the newest step whose extra reads: the start-up check, before the model loads."""
    for step in reversed(self.steps()):
      try:
        extra = self.read_extra(step)
      except Exception:  # noqa: BLE001 -- unreadable: restore_latest moves it aside later
        continue
      self.check_config(step, extra, config)
      return

  def restore_latest(self, abstract_state: Any, config: ml_collections.ConfigDict
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, extra) of the newest checkpoint that loads, or None when there is none.

    abstract_state: a pytree of jax.ShapeDtypeStruct with shardings (see `abstract_like`). Raises
    ResumeError on an incompatible checkpoint; moves an unreadable one to corrupt/<step> and tries the one before.
    """
    for step in reversed(self.steps()):
      try:
        extra = self.read_extra(step)
        metadata = self.manager.item_metadata(step)["state"]
      except Exception as error:  # noqa: BLE001 -- unreadable data, whatever the backend raises
        self._move_aside(step, error)
        continue
      self.check_config(step, extra, config)
      mismatches = layout_mismatches(metadata, abstract_state)
      if mismatches:
        shown = "; ".join(mismatches[:4]) + (f"; and {len(mismatches) - 4} more" if len(mismatches) > 4 else "")
        raise ResumeError(f"the checkpoint {self.directory}/{step} holds a different train state ({shown}); "
                          + _ways_out(self.directory))
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
      except Exception as error:  # noqa: BLE001
        self._move_aside(step, error)
        continue
      return step, restored.state, extra
    return None

  def _move_aside(self, step: int, error: BaseException) -> None:
    """checkpoints/<step> -> checkpoints/corrupt/<step>[.N]: kept for inspection, and no longer a step."""
    target = self.directory / "corrupt" / str(step)
    if jax.process_index() == 0:
      suffix = 0
      while target.exists():
        suffix += 1
        target = self.directory / "corrupt" / f"{step}.{suffix}"
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    _sync(f"mcpo_jax:corrupt:{step}")
    self.manager.reload()
    logging.warning("checkpoint %s/%d cannot be read (%s); moved to %s, restoring the one before",
                    self.directory, step, _one_line(error), target)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def previous_run(workdir: epath.Path) -> list[str]:
  """What a run left in `workdir` (checkpoints, metrics, evaluations); empty for a new or empty workdir."""
  found = [name for name in ("metrics.jsonl", "evaluations.json", "eval", "tensorboard") if (workdir / name).exists()]
  checkpoints = workdir / "checkpoints"
  if checkpoints.exists() and any(p.name.isdigit() or p.name == "corrupt" for p in checkpoints.iterdir()):
    found.insert(0, "checkpoints")
  return found


def prepare_workdir(config: ml_collections.ConfigDict) -> None:
  """Applies config.resume / config.overwrite to what the workdir holds, before anything heavy loads.

  resume=auto: the newest checkpoint's config must match the PINNED fields (ResumeError otherwise).
  resume=none: a workdir holding a run is refused, unless overwrite=true, which renames it to
  <workdir>.overwritten-<time> (nothing is deleted) and starts in a fresh one.
  """
  workdir = _absolute(config.workdir)
  _check_writable(workdir)
  if config.resume == "none":
    found = previous_run(workdir) if workdir.exists() else []
    if found and not config.overwrite:
      raise ResumeError(f"--config.resume=none, but {workdir} holds a previous run ({', '.join(found)}); use a new "
                        "--config.workdir, or add --config.overwrite=true to move the old run aside and start afresh.")
    if found:
      aside = workdir.parent / f"{workdir.name}.overwritten-{time.strftime('%Y%m%d-%H%M%S')}"
      if jax.process_index() == 0:
        workdir.rename(aside)
        print(f"moved the previous run in {workdir} to {aside}")
      _sync("mcpo_jax:overwrite")
  elif (workdir / "checkpoints").exists():
    checkpointer = open_checkpoints(config)
    try:
      checkpointer.check_newest_config(config)
    finally:
      checkpointer.close()  # an open manager's threads would print a traceback at exit if the run stops here


def _check_writable(workdir: epath.Path) -> None:
  """A local workdir that cannot be made is found now, not after the model has loaded. The probe makes and removes
  a directory in the nearest existing ancestor (permission bits alone say yes to root on /proc or a read-only
  mount); nothing is left behind. gs:// paths are checked by their first write."""
  if "://" in str(workdir):
    return
  ancestor = next(p for p in [workdir, *workdir.parents] if p.exists())
  try:
    os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".mcpo-write-probe-"))
  except OSError as error:
    raise ResumeError(f"--config.workdir={workdir}: cannot be written ({ancestor}: {error.strerror}); choose a "
                      "directory this process can create files in.") from None


def open_checkpoints(config: ml_collections.ConfigDict) -> Checkpointer:
  """The run's Checkpointer on <workdir>/checkpoints, with the config's retention policy."""
  return Checkpointer(_absolute(config.workdir) / "checkpoints", keep_last=config.checkpoint.keep_last,
                      keep_best=config.checkpoint.keep_best, best_metric=config.checkpoint.best_metric or None)


def _absolute(workdir: str) -> epath.Path:
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of `state`, the restore target that places each shard directly."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag the loop polls between the phases of a step, so it can save the
  last completed step within the grace period a preemption gives (TPU VMs: ~30 s after SIGTERM).

  A second signal of the same kind kills as usual. With several processes, `requested` is true on all
  of them as soon as one has been signalled (they must stop at the same point to save collectively).
  """

  def __init__(self, grace_s: float = 25.0):
    self.grace_s = grace_s
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}
    self._overdue: threading.Timer | None = None

  @property
  def requested(self) -> bool:
    if jax.process_count() == 1:
      return self._event.is_set()
    return bool(multihost_utils.process_allgather(int(self._event.is_set())).max())

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    if self._event.is_set():  # second signal: restore the default behaviour and re-raise it
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
    logging.warning("received %s: saving the last completed step before exiting", signal.Signals(signum).name)
    self._event.set()
    self._overdue = threading.Timer(self.grace_s, logging.error, args=(
        "the phase in flight outlasted checkpoint.preemption_grace_s=%gs; the save starts when it ends", self.grace_s))
    self._overdue.daemon = True
    self._overdue.start()

  def saving(self) -> None:
    """The loop has reached a phase boundary and starts the save: the grace period was met."""
    if self._overdue is not None:
      self._overdue.cancel()

  def __exit__(self, *exc) -> None:
    self.saving()
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
