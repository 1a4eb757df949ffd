"""Hugging Face safetensors checkpoints in and out of the sharded NNX decoder.

Loading reads one tensor at a time (local files through `safetensors`, gs:// through parallel
byte-range reads of the same format) and places each straight into its sharded jax.Array. Each host
reads only the rows of a tensor that its own devices' shards span, and every device gets its slice.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from mcpo_jax.mesh import from_host, named_sharding
from mcpo_jax.model.config import ModelConfig
from mcpo_jax.model.transformer import Transformer

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_SHARD_BYTES = 4 * 1024**3


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as asked, naming the file or tensor and the fix."""


def _is_remote(path: str | os.PathLike) -> bool:
  return str(path).startswith(("gs://", "s3://"))


def read_config(directory: str | os.PathLike) -> ModelConfig:
  directory = epath.Path(directory)
  if not directory.exists():
    raise CheckpointError(f"checkpoint directory {directory} does not exist; pass an HF checkpoint directory "
                          "(config.json + *.safetensors), a .gguf file, or 'smollm2-135m-instruct'.")
  config_file = directory / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{config_file} is missing; an HF checkpoint directory needs config.json beside its "
                          "*.safetensors files (save one with transformers' save_pretrained).")
  return ModelConfig.from_hf_dict(json.loads(config_file.read_text()), source=str(config_file))


# ----------------------------------------------------------------------------------------------
# Name and layout map: our parameter path <-> HF tensor name, HF shape, and whether HF stores the
# transpose (torch Linear keeps [out, in]; we keep [in, ...out] so einsums read left to right).


def hf_tensor_specs(config: ModelConfig) -> dict[tuple, tuple[str, tuple[int, ...], bool]]:
  """Our param path -> (HF tensor name, HF shape, transposed)."""
  e, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  specs = {
      ("embed",): ("model.embed_tokens.weight", (v, e), False),
      ("final_norm", "scale"): ("model.norm.weight", (e,), False),
  }
  if not config.tie_word_embeddings:
    specs[("lm_head",)] = ("lm_head.weight", (v, e), True)
  for i in range(config.num_layers):
    hf = f"model.layers.{i}."
    ours = ("layers", i)
    specs[ours + ("input_norm", "scale")] = (hf + "input_layernorm.weight", (e,), False)
    specs[ours + ("post_attention_norm", "scale")] = (hf + "post_attention_layernorm.weight", (e,), False)
    for name, out in (("q", q), ("k", kv), ("v", kv)):
      specs[ours + ("attn", f"{name}_proj")] = (hf + f"self_attn.{name}_proj.weight", (out, e), True)
      if config.attention_bias:
        specs[ours + ("attn", f"{name}_bias")] = (hf + f"self_attn.{name}_proj.bias", (out,), False)
    specs[ours + ("attn", "o_proj")] = (hf + "self_attn.o_proj.weight", (e, q), True)
    if config.qk_norm:
      specs[ours + ("attn", "q_norm", "scale")] = (hf + "self_attn.q_norm.weight", (config.head_dim,), False)
      specs[ours + ("attn", "k_norm", "scale")] = (hf + "self_attn.k_norm.weight", (config.head_dim,), False)
    specs[ours + ("mlp", "gate_proj")] = (hf + "mlp.gate_proj.weight", (f, e), True)
    specs[ours + ("mlp", "up_proj")] = (hf + "mlp.up_proj.weight", (f, e), True)
    specs[ours + ("mlp", "down_proj")] = (hf + "mlp.down_proj.weight", (e, f), True)
  return specs


def _hf_to_ours(tensor: np.ndarray, our_shape: tuple[int, ...], transposed: bool) -> np.ndarray:
  return (tensor.T if transposed else tensor).reshape(our_shape)


def _ours_to_hf(array: np.ndarray, hf_shape: tuple[int, ...], transposed: bool) -> np.ndarray:
  return array.reshape(hf_shape[::-1]).T if transposed else array.reshape(hf_shape)


# ----------------------------------------------------------------------------------------------
# Reading


class _RemoteSafetensorsFile:
  """Byte-range reads of a .safetensors file on gs:// (the safetensors library needs a local path).

  The format is an 8-byte little-endian header length, a JSON header of dtype/shape/offsets, then
  the raw little-endian tensor bytes, row-major: rows [start, stop) of a tensor are one byte range,
  read in chunks of at most CHUNK_BYTES by parallel requests.
  """

  CHUNK_BYTES = 32 * 1024**2
  PARALLEL_READS = 16

  def __init__(self, path: epath.Path):
    self.path = path
    with path.open("rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      self.header = {k: v for k, v in json.loads(f.read(header_len)).items() if k != "__metadata__"}
    self.data_start = 8 + header_len

  def keys(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    info = self.header[name]
    dtype, shape = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    first = self.data_start + info["data_offsets"][0] + start * row_bytes
    out = np.empty((stop - start) * row_bytes, np.uint8)

    def read(offset: int) -> None:
      with self.path.open("rb") as f:
        f.seek(first + offset)
        chunk = f.read(min(self.CHUNK_BYTES, out.size - offset))
      out[offset:offset + len(chunk)] = np.frombuffer(chunk, np.uint8)

    offsets = range(0, out.size, self.CHUNK_BYTES)
    if len(offsets) == 1:
      read(0)
    else:
      with concurrent.futures.ThreadPoolExecutor(min(self.PARALLEL_READS, len(offsets))) as pool:
        list(pool.map(read, offsets))
    return out.view(dtype).reshape((stop - start, *shape[1:]))


class _LocalSafetensorsFile:
  """safetensors' memory-mapped reader; the 'flax' framework because numpy has no bfloat16."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._handle = safetensors.safe_open(str(path), framework="flax")

  def keys(self) -> list[str]:
    return list(self._handle.keys())

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle.get_slice(name).get_shape())

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's own CPU
      return np.asarray(self._handle.get_slice(name)[start:stop])


class SafetensorsCheckpoint:
  """Tensor name -> file over a single model.safetensors or a sharded model.safetensors.index.json."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = epath.Path(directory)
    index_file = self.directory / "model.safetensors.index.json"
    if index_file.exists():
      weight_map = json.loads(index_file.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in self.directory.glob("*.safetensors"))
      weight_map = None
    if not files:
      raise CheckpointError(f"{self.directory} holds no *.safetensors files; export the checkpoint with "
                            "transformers' save_pretrained(..., safe_serialization=True).")
    opener = _RemoteSafetensorsFile if _is_remote(self.directory) else _LocalSafetensorsFile
    self._files = {name: opener(self.directory / name) for name in files}
    self.weight_map = weight_map or {k: name for name, f in self._files.items() for k in f.keys()}

  def read_rows(self, name: str, expected_shape: tuple[int, ...], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of tensor `name` (all of it: 0, expected_shape[0]), after checking its shape."""
    if name not in self.weight_map:
      raise CheckpointError(
          f"tensor {name!r} is missing from {self.directory} ({len(self.weight_map)} tensors in "
          f"{', '.join(self._files)}); the checkpoint does not match its config.json.")
    file = self._files[self.weight_map[name]]
    if file.shape(name) != tuple(expected_shape):
      raise CheckpointError(
          f"tensor {name!r} in {file.path} has shape {file.shape(name)} but config.json "
          f"implies {tuple(expected_shape)}; the config and the weights disagree (wrong config.json?).")
    return file.read_rows(name, start, stop)


def abstract_transformer(config: ModelConfig, mesh: Mesh | None, **model_kwargs) -> Transformer:
  """A Transformer of ShapeDtypeStructs (nothing allocated) whose Variables carry their logical axes."""
  return nnx.eval_shape(lambda: Transformer(config, mesh=mesh, rngs=nnx.Rngs(0), **model_kwargs))


def _row_axis(hf_shape: tuple[int, ...], our_shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
  """(our axis whose slice picks the HF tensor's rows, HF rows per index of that axis).

  Ours is the HF tensor, or its transpose, reshaped. Untransposed, HF's rows run along our axis 0.
  Transposed ([out, in] -> [in..., out...]), they run along our first axis past the dims that make up `in`.
  """
  if not transposed:
    elements, row = math.prod(our_shape[1:]), math.prod(hf_shape[1:])
    assert elements % row == 0, (hf_shape, our_shape)
    return 0, elements // row
  axis, columns = 0, 1
  while columns < hf_shape[1]:
    columns *= our_shape[axis]
    axis += 1
  assert columns == hf_shape[1], (hf_shape, our_shape)
  return axis, math.prod(our_shape[axis + 1:])


def _span(indices: list[tuple[slice, ...]], axis: int, size: int) -> tuple[int, int]:
  """[low, high) along `axis` covering every index of `indices`."""
  spans = [index[axis].indices(size)[:2] for index in indices]
  return min(start for start, _ in spans), max(stop for _, stop in spans)


def host_read_shares(config: ModelConfig, mesh: Mesh, host_of: Callable[[jax.Device], int] = lambda d: d.process_index
                     ) -> dict[int, float]:
  """host -> the share of the checkpoint's elements that loading reads on it (1.0: all of it)."""
  specs, read, total = hf_tensor_specs(config), {}, 0
  for path, variable in nnx.to_flat_state(nnx.state(abstract_transformer(config, mesh))):
    hf_name, hf_shape, transposed = specs[path]
    shape = tuple(variable.shape)
    axis, rows_per_index = _row_axis(hf_shape, shape, transposed)
    by_host = {}
    for device, index in named_sharding(mesh, variable.logical_axes, shape).devices_indices_map(shape).items():
      by_host.setdefault(host_of(device), []).append(index)
    for host, indices in by_host.items():
      low, high = _span(indices, axis, shape[axis])
      read[host] = read.get(host, 0) + (high - low) * rows_per_index * math.prod(hf_shape[1:])
    total += math.prod(hf_shape)
  return {host: elements / total for host, elements in sorted(read.items())}


def _host_shards(checkpoint: SafetensorsCheckpoint, hf_name: str, hf_shape: tuple[int, ...], transposed: bool,
                 shape: tuple[int, ...], indices: list[tuple[slice, ...]]) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """Reads the HF rows that the shards at `indices` (this host's, in our layout `shape`) span, as one range
  from the lowest to the highest; returns index -> that shard of our layout."""
  axis, rows_per_index = _row_axis(hf_shape, shape, transposed)
  low, high = _span(indices, axis, shape[axis])
  rows = checkpoint.read_rows(hf_name, hf_shape, low * rows_per_index, high * rows_per_index)
  block = _hf_to_ours(rows, shape[:axis] + (high - low,) + shape[axis + 1:], transposed)  # ours[..., low:high, ...]

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    start, stop, _ = index[axis].indices(shape[axis])
    return block[index[:axis] + (slice(start - low, stop - low),) + index[axis + 1:]]

  return shard


def _read_placed(checkpoint: SafetensorsCheckpoint, hf_name: str, hf_shape: tuple[int, ...], transposed: bool,
                 variable: nnx.Variable, mesh: Mesh | None, dtype) -> jax.Array:
  """One parameter as a jax.Array; with a mesh, each device receives only its slice."""
  shape = tuple(variable.shape)
  if mesh is None:
    whole = (slice(None),) * len(shape)
    return jnp.asarray(_host_shards(checkpoint, hf_name, hf_shape, transposed, shape, [whole])(whole), dtype)
  sharding = named_sharding(mesh, variable.logical_axes, shape)
  shard = _host_shards(checkpoint, hf_name, hf_shape, transposed, shape,
                       list(sharding.addressable_devices_indices_map(shape).values()))
  return jax.make_array_from_callback(shape, sharding, lambda index: np.asarray(shard(index), dtype))


def load_hf_checkpoint(directory: str | os.PathLike, *, mesh: Mesh | None = None, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32, remat: str = "none", attention: str = "auto") -> Transformer:
  """An HF checkpoint directory (local or gs://) -> a Transformer with sharded parameters."""
  config = read_config(directory)
  checkpoint = SafetensorsCheckpoint(directory)
  model = abstract_transformer(config, mesh, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
  graphdef, state = nnx.split(model)
  specs = hf_tensor_specs(config)
  flat = []
  for path, variable in nnx.to_flat_state(state):
    hf_name, hf_shape, transposed = specs[path]
    flat.append((path, variable.replace(_read_placed(checkpoint, hf_name, hf_shape, transposed, variable, mesh,
                                                     param_dtype))))
  unused = set(checkpoint.weight_map) - {name for name, _, _ in specs.values()}
  if unused - {"lm_head.weight"}:
    logging.warning("%s: %d tensors not used by the model, e.g. %s", directory, len(unused), sorted(unused)[:3])
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def shard_model(model: Transformer, mesh: Mesh) -> Transformer:
  """Re-places every parameter of `model` on `mesh` according to its logical axes."""
  graphdef, state = nnx.split(model)
  place = lambda v: from_host(v[...], named_sharding(mesh, v.logical_axes, v.shape))
  flat = [(path, v.replace(place(v))) for path, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------------
# Writing


def _host_tensors(model: Transformer, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, host array) pairs, one at a time; gathers shards across hosts when needed."""
  specs = hf_tensor_specs(model.config)
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = variable[...]
    if not value.is_fully_addressable:
      value = multihost_utils.process_allgather(value, tiled=True)
    hf_name, hf_shape, transposed = specs[path]
    yield hf_name, np.ascontiguousarray(_ours_to_hf(np.asarray(value).astype(dtype), hf_shape, transposed))


def save_hf_checkpoint(model: Transformer, directory: str | os.PathLike, *, tokenizer=None,
                       dtype: Any = np.float32, max_shard_bytes: int = MAX_SHARD_BYTES) -> epath.Path:
  """Writes config.json + safetensors (sharded with an index above `max_shard_bytes`) + tokenizer.

  Tensors stream to disk a shard at a time. Only process 0 writes; every process must call this
  (the cross-host gather is collective).
  """
  directory = epath.Path(directory)
  writer = jax.process_index() == 0
  if writer:
    directory.mkdir(parents=True, exist_ok=True)
  shard: dict[str, np.ndarray] = {}
  written: list[tuple[epath.Path, list[str]]] = []

  def flush():
    if writer and shard:
      path = directory / f"model-part-{len(written):05d}.safetensors"
      path.write_bytes(safetensors.numpy.save(shard, metadata={"format": "pt"}))
      written.append((path, list(shard)))
    shard.clear()

  total = 0
  for name, tensor in _host_tensors(model, dtype):
    if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > max_shard_bytes:
      flush()
    shard[name] = tensor
    total += tensor.nbytes
  flush()
  if not writer:
    return directory
  if len(written) == 1:
    written[0][0].rename(directory / "model.safetensors")
  else:
    weight_map = {}
    for i, (path, names) in enumerate(written):
      final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
      path.rename(directory / final)
      weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  hf_config = model.config.to_hf_dict() | {"torch_dtype": np.dtype(dtype).name}
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(directory))
  return directory


def num_params(model: Transformer) -> int:
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))

