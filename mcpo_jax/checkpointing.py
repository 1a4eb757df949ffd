"""Orbax checkpoints of the train state plus JSON extras (data-iterator state, RNG, config), resume and preemption.

Keeps the newest `keep_last` checkpoints and the `keep_best` best by an eval metric; saves are
asynchronous. Restoring walks back from the newest checkpoint, skipping (with a warning) any that
fails to load, e.g. one cut short by a crash.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation


class Checkpointer:
  """Wraps an orbax CheckpointManager holding items "state" (a pytree) and "extra" (JSON)."""

  def __init__(self, directory: str | epath.PathLike, *, keep_last: int = 3, keep_best: int = 1,
               best_metric: str | None = None, best_mode: str = "max", async_save: bool = True):
    # orbax's tensorstore writer needs an absolute path: `runs/default` is resolved against the cwd.
    self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
    policies = [preservation.LatestN(n=keep_last)]
    if best_metric and keep_best > 0:
      policies.append(preservation.BestN(get_metric_fn=lambda metrics: metrics[best_metric],
                                         reverse=best_mode == "min", n=keep_best,
                                         keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation.AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

  def save(self, step: int, state: Any, extra: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    extra=ocp.args.JsonSave(extra)),
                      metrics=metrics, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, extra) of the newest checkpoint that loads, or None when there is none.

    abstract_state: a pytree of jax.ShapeDtypeStruct with shardings (see `abstract_like`).
    """
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
      except Exception as error:  # a partial or corrupted checkpoint: fall back to the one before
        logging.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                        self.directory, step, type(error).__name__, str(error)[:200])
        continue
      return step, restored.state, restored.extra
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of `state`, the restore target that places each shard directly."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag the loop polls, so it can checkpoint before exiting.

  TPU VMs send SIGTERM on preemption; a second signal of the same kind kills as usual.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    if self._event.is_set():  # second signal: restore the default behaviour and re-raise it
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
    logging.warning("received %s: saving a checkpoint before exiting", signal.Signals(signum).name)
    self._event.set()

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
