"""XLA:TPU compiler flags that the RL programs need, given to libtpu before it loads (LIBTPU_INIT_ARGS).

libtpu reads LIBTPU_INIT_ARGS once, when JAX first loads it: `run.py` and `mcpo_jax.aot` call
`set_tpu_flags()` before anything touches a device. A flag the user already set there is left as
the user set it, so `LIBTPU_INIT_ARGS=--xla_tpu_choose_faster_windowed_einsum_over_mem=true` restores
XLA's default.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TPU_FLAGS = {
    # FSDP's weight all-gathers are overlapped with their matmuls ("windowed einsum"). Preferring speed over
    # memory, XLA:TPU kept every layer's float32 matmul accumulators alive at once: Qwen2.5-7B's reference pass
    # on v5e-64 planned 16.1 GB of temporaries (of 15.75 usable). Off, 4 layers plan 1.04 GB instead of 3.48.
    "xla_tpu_choose_faster_windowed_einsum_over_mem": "false",
}


def set_tpu_flags(environ: MutableMapping[str, str] = os.environ) -> str:
  """Adds TPU_FLAGS to LIBTPU_INIT_ARGS, keeping every flag already there; returns the new value."""
  current = environ.get("LIBTPU_INIT_ARGS", "").split()
  named = {arg.lstrip("-").split("=")[0] for arg in current}
  value = " ".join(current + [f"--{name}={setting}" for name, setting in TPU_FLAGS.items() if name not in named])
  environ["LIBTPU_INIT_ARGS"] = value
  return value
