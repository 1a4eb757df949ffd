"""Validation of the run config: every user mistake becomes one message naming the field and the fix."""

from __future__ import annotations

import difflib

import ml_collections

from mcpo_jax.model.transformer import REMAT_POLICIES

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
  for axis in ("data", "fsdp", "tensor"):
    size = config.mesh[axis]
    if size != -1 and size < 1:
      raise ConfigError(f"--config.mesh.{axis}={size}; use a positive size or -1 (the rest of the devices).")
  chat = config.chat
  if chat.max_new_tokens < 1:
    raise ConfigError(f"--config.chat.max_new_tokens={chat.max_new_tokens}; it must be at least 1.")
  if chat.temperature < 0:
    raise ConfigError(f"--config.chat.temperature={chat.temperature}; use 0 (greedy) or a positive value.")
  if not 0 < chat.top_p <= 1:
    raise ConfigError(f"--config.chat.top_p={chat.top_p}; it must be in (0, 1].")
  return config
