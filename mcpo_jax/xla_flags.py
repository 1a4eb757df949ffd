"""XLA flags the entry points set before JAX creates its backends.

On CPU, XLA lowers matmuls to the YNNPACK library but, by default, leaves the elementwise ops around
them (SwiGLU and its backward, RMSNorm, softmax) to its own loop emitter. In the backward pass, layout
assignment then makes those elementwise fusions write their output transposed, for the weight-gradient
matmuls that read them: strided stores that took ~17% of an update step (jax 0.10.2, SmolLM2-135M
shapes, measured with the profiler; benchmarks/README.md). Letting YNNPACK take elementwise fusions
too removes those copies: 134 -> 156 tokens/s on the same update. The flag is ignored by other backends.
"""

from __future__ import annotations

import os

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


def set_default_xla_flags() -> None:
  """Adds CPU_FLAGS to XLA_FLAGS, keeping every flag the user already set (theirs wins).

  Call it before the first jax.devices() / computation: XLA reads XLA_FLAGS once, when the
  backend is created (importing jax does not create it).
  """
  current = os.environ.get("XLA_FLAGS", "")
  missing = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if f"--{name}=" not in current]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
