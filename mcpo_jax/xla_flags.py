"""XLA flags the entry points set before JAX creates its backends.

On CPU, XLA lowers matmuls to the YNNPACK library but, by default, leaves the elementwise ops around
them (SwiGLU and its backward, RMSNorm, softmax) to its own loop emitter. In the backward pass, layout
assignment then makes those elementwise fusions write their output transposed, for the weight-gradient
matmuls that read them: strided stores that took ~17% of an update step (jax 0.10.2, SmolLM2-135M
shapes, measured with the profiler; benchmarks/README.md). Letting YNNPACK take elementwise fusions
too removes those copies: 134 -> 156 tokens/s on the same update.

The flags are CPU-only and experimental, and XLA aborts on a flag its version does not know, so they
are added only where JAX can only run on the CPU: no accelerator plugin (TPU, CUDA, ROCm) installed and
JAX_PLATFORMS, if set, naming the CPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}


def cpu_only() -> bool:
  """Whether JAX's backend will be the CPU: no accelerator plugin, and JAX_PLATFORMS (if set) is CPU."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  has_plugin = any(True for _ in importlib.metadata.entry_points(group="jax_plugins"))
  return not has_plugin and importlib.util.find_spec("libtpu") is None


def set_default_xla_flags() -> None:
  """On a CPU-only install, adds CPU_FLAGS to XLA_FLAGS, keeping every flag the user set (theirs wins).

  Call it before the first jax.devices() / computation: XLA reads XLA_FLAGS once, when the
  backend is created (importing jax does not create it).
  """
  if not cpu_only():
    return
  current = os.environ.get("XLA_FLAGS", "")
  missing = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if f"--{name}=" not in current]
  if missing:
    os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()
