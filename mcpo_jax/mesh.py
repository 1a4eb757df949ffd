"""Device mesh, the one logical-axis rules table, and helpers that shard arrays by logical names.

Parameters and activations name their dimensions logically ("batch", "embed", "heads", ...); the
table below maps those names to the mesh axes ("data", "fsdp", "tensor"). A new parallelism layout
is therefore a mesh-shape change, never a model change. A program may trace under `axis_rules(overrides)`,
which remaps some names for that trace only (the sampler's MLP_OVER_FSDP).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Batch splits over data and fsdp (data parallel + ZeRO-3 style weight
# sharding), weights split over fsdp on their embed dimension and Megatron-style over tensor.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "mlp_rows": ("data", "fsdp"),  # the MLP's activation rows: the batch, unless a trace remaps it (axis_rules)
    "vocab": ("tensor",),
    "length": (),
    "head_dim": (),
    "norm": (),
}

LogicalAxes = Sequence[str | None]
_overrides: contextvars.ContextVar[Mapping[str, tuple[str, ...]]] = contextvars.ContextVar("axis_rules", default={})


@contextlib.contextmanager
def axis_rules(overrides: Mapping[str, tuple[str, ...]]) -> Iterator[None]:
  """Within the block, the named logical axes map to these mesh axes instead (read while tracing, so a
  jitted function must enter it inside its own body to keep its cache key honest)."""
  unknown = set(overrides) - set(LOGICAL_AXIS_RULES)
  if unknown:
    raise ValueError(f"axis_rules: unknown logical axes {sorted(unknown)}")
  token = _overrides.set({**_overrides.get(), **overrides})
  try:
    yield
  finally:
    _overrides.reset(token)


class MeshError(ValueError):
  """A mesh shape that does not fit the devices, with the fix."""


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> tuple[int, int, int]:
  """Sizes for (data, fsdp, tensor); one entry may be -1 and takes the remaining devices."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"mesh: unknown axis {sorted(unknown)}; the axes are {MESH_AXES}.")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(
          f"mesh: the fixed axes {dict(zip(MESH_AXES, sizes))} multiply to {known}, which does not divide "
          f"the {num_devices} devices; make their product a divisor of {num_devices}.")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f"mesh: data×fsdp×tensor = {'×'.join(map(str, sizes))} = {math.prod(sizes)} but there are "
        f"{num_devices} devices; set --config.mesh.data/fsdp/tensor so the product is {num_devices}, or one of them to -1.")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axis types over `devices` (default: all).

  On TPU the devices are laid out along the chips' physical torus, splitting a physical axis where a mesh
  axis needs it (v6e:16x16 as 4 × 64, v5p:2x4x4 as 16 × 2). Over several slices (multi-slice, joined by
  the data-centre network) the data axis spans the slices and fsdp and tensor stay inside each one, so
  only the once-per-step gradient all-reduce crosses the slower links.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
  slices = len({getattr(device, "slice_index", 0) for device in devices})
  if slices > 1:
    if sizes[0] % slices:
      raise MeshError(f"mesh: data={sizes[0]} over {slices} TPU slices; the data axis spans the slices, so set "
                      f"--config.mesh.data to a multiple of {slices}.")
    grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // slices, sizes[1], sizes[2]), (slices, 1, 1), devices,
                                                allow_split_physical_axes=True)
  else:
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical_axes: LogicalAxes, shape: Sequence[int], mesh: Mesh,
                    replicated: Collection[str] = ()) -> PartitionSpec:
  """PartitionSpec for an array of `shape`; a mesh axis that does not divide its dimension is dropped,
  and so is every logical axis named in `replicated`.

  Replicating such a dimension lets one rules table serve every model and batch: 4 KV heads on a
  tensor axis of 8 stay replicated (as Megatron does for GQA), and a single chat prompt runs on any
  mesh. Query heads must still divide the tensor axis; the model config checks that.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
  rules = {**LOGICAL_AXIS_RULES, **_overrides.get()}
  spec, used = [], set()
  for name, dim in zip(logical_axes, shape):
    if name is None or name in replicated:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"unknown logical axis {name!r}; known: {sorted(rules)}")
    kept = []
    for axis in rules[name]:
      size = mesh.shape[axis]
      if size > 1 and axis not in used and dim % (math.prod(mesh.shape[a] for a in kept) * size) == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: LogicalAxes, shape: Sequence[int],
                   replicated: Collection[str] = ()) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, replicated))


def constrain(x: jax.Array, mesh: Mesh | None, logical_axes: LogicalAxes) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op only when there is no mesh at all."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, x.shape))


def from_host(x: np.ndarray | jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
  """A global array from a value every process holds in full (a host array or a local jax.Array);
  each process fills only its own shards, so this is the same call on one host and on a pod."""
  x = to_host(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of `x` on this host; gathers across processes when `x` is not fully addressable."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when this process is one of several (TPU pod, multi-GPU, CPU).

  Detection is by the environment the launchers set; single-host runs are left alone. TPU pods,
  SLURM and MPI are auto-detected by JAX; anywhere else (e.g. several CPU processes on one machine)
  set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  multi_host = (
      "JAX_COORDINATOR_ADDRESS" in os.environ
      or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
      or int(os.environ.get("SLURM_NTASKS", "1")) > 1)
  if multi_host and not jax.distributed.is_initialized():
    explicit = {}
    if "JAX_NUM_PROCESSES" in os.environ or "JAX_PROCESS_ID" in os.environ:
      try:
        explicit = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                        process_id=int(os.environ["JAX_PROCESS_ID"]))
      except (KeyError, ValueError) as error:
        raise MeshError("set both JAX_NUM_PROCESSES and JAX_PROCESS_ID to integers (process ids count from 0), "
                        f"or neither to let JAX detect them: {error!r}") from None
    jax.distributed.initialize(**explicit)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return multi_host
