"""Validation of the run config: every user mistake becomes one message naming the field and the fix."""

from __future__ import annotations

import difflib

import ml_collections

from mcpo_jax.model.transformer import REMAT_POLICIES
from mcpo_jax.objectives import DENOMINATORS

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  pass


def _choice(config: ml_collections.ConfigDict, field: str, allowed) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in allowed:
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"--config.{field}={value!r} is not allowed{hint}; choose one of {list(allowed)}.")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks values that ml_collections' type checks cannot (choices, ranges); returns the config."""
  _choice(config, "mode", ("train", "chat"))
  _choice(config, "algorithm", ("mcpo", "grpo"))
  _choice(config, "resume", ("auto", "none"))
  _choice(config, "rewards.sandbox", ("bwrap", "unsafe"))
  _choice(config, "model.dtype", DTYPES)
  if config.model.param_dtype:
    _choice(config, "model.param_dtype", DTYPES)
  _choice(config, "model.remat", tuple(REMAT_POLICIES))
  _choice(config, "objective.denominator", DENOMINATORS)
  if config.objective.head_warmup_steps < 0:
    raise ConfigError(f"--config.objective.head_warmup_steps={config.objective.head_warmup_steps}; use 0 (no "
                      "warm-up) or the number of first RL steps that train the contrastive head alone.")
  for axis in ("data", "fsdp", "tensor"):
    size = config.mesh[axis]
    if size != -1 and size < 1:
      raise ConfigError(f"--config.mesh.{axis}={size}; use a positive size or -1 (the rest of the devices).")
  _checkpoint(config)
  chat = config.chat
  if chat.max_new_tokens < 1:
    raise ConfigError(f"--config.chat.max_new_tokens={chat.max_new_tokens}; it must be at least 1.")
  if chat.temperature < 0:
    raise ConfigError(f"--config.chat.temperature={chat.temperature}; use 0 (greedy) or a positive value.")
  if not 0 < chat.top_p <= 1:
    raise ConfigError(f"--config.chat.top_p={chat.top_p}; it must be in (0, 1].")
  return config


def _checkpoint(config: ml_collections.ConfigDict) -> None:
  """checkpoint.*: found here, not at the first save (inside orbax's thread) or the last one (after the run)."""
  ckpt = config.checkpoint
  for field, least in (("every", 0), ("keep_last", 1), ("keep_best", 0)):
    if ckpt[field] < least:
      raise ConfigError(f"--config.checkpoint.{field}={ckpt[field]}; it must be at least {least}.")
  if not ckpt.preemption_grace_s > 0:
    raise ConfigError(f"--config.checkpoint.preemption_grace_s={ckpt.preemption_grace_s}; use the seconds a "
                      "preemption leaves before the kill (TPU VMs: about 30), a positive number.")
  if ckpt.best_metric:
    metrics = ["pass@1"] + ([f"mean@{config.eval.k}"] if config.eval.k > 0 else [])
    allowed = [f"eval/{scope}/{metric}" for scope in ["mean", *config.data.domains.keys()] for metric in metrics]
    if ckpt.best_metric not in allowed:
      close = difflib.get_close_matches(ckpt.best_metric, allowed, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"--config.checkpoint.best_metric={ckpt.best_metric!r} is not an eval metric{hint}; choose "
                        f"one of {allowed}, or '' to keep no best checkpoint.")
