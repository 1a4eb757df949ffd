"""Compile every program of the RL loop for a TPU topology on this host, with no TPU: does it fit?

  python -m mcpo_jax.aot --config=configs/multi_domain.py:qwen2.5-7b-instruct --topology=v5e:8x8

libtpu (requirements-tpu.txt) describes a pod's chips without owning one; XLA:TPU then compiles the
rollout, the reference (and recomputed old) log-probs, the update, the diagnostics and the evaluation as the run
would jit them, on a mesh of the topology's devices, from abstract shapes (no weights are read or made).
Per program it prints the per-chip memory XLA plans (arguments, outputs, temporaries; donated buffers
counted once) against the chip's HBM, the model FLOPs per chip, the bytes its collectives move per chip,
and a lower bound on the time: the largest of compute at peak, HBM traffic at full bandwidth and
collective bytes at the chip's ICI bandwidth (no overlap, no topology model). It exits 1 when a program
does not fit with --headroom to spare.

FLOPs are counted from the model's shapes, not from XLA's cost analysis: the cost analysis counts a
loop body once (a fori_loop of 10 matmuls reports the FLOPs of one), and the sampler's decode loop and
the update's micro-batch scan are loops. A decode step is compiled on its own, against its prompts' keys
(one copy per prompt) and the response slots its loop attends over (rollout.decode_segments), and counted
once per step: its collective bytes, and as HBM traffic the bytes of its arguments, the weights and cache
slots every token must read. Not
XLA's "bytes accessed" for it: on TPU that also counts the buffers XLA stages through on-chip VMEM
(the 7B preset's decode step on v6e-256: 9.8 GB, about twice its 5.0 GB of arguments), which is not
HBM traffic, and the bound must stay a lower bound.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mcpo_jax import config as config_lib
from mcpo_jax.batch import TrainBatch
from mcpo_jax.diagnostics import gradient_cosines_program
from mcpo_jax.flag_errors import define_config, parse_flags
from mcpo_jax.mesh import axis_rules, make_mesh, named_sharding
from mcpo_jax.model.config import ModelConfig
from mcpo_jax.model.transformer import CACHE_AXES, KVCache, LayerKV
from mcpo_jax.model.weights import abstract_transformer, host_read_shares
from mcpo_jax.tpu_flags import set_tpu_flags
from mcpo_jax.sampling import (DECODE_GATHERED, DecodePlan, decode_segment_ends, generate_program, next_power_of_two,
                               prompt_bucket)
from mcpo_jax.train import TrainState, jit_sequence_logprobs, jit_update_step, make_optimizer

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: float  # what XLA:TPU may plan into ("available HBM" in its out-of-memory errors), not the nominal size
  peak_flops: float  # bf16 dense, per chip
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s into one chip over its inter-chip links


# Per chip, keyed by the device_kind libtpu reports: the HBM XLA:TPU reports available to a program (libtpu
# 0.0.42.1; a v4 device is one TensorCore) and the public peak, HBM and ICI figures (Cloud TPU system-architecture
# pages).
CHIPS = {
    "TPU v4": Chip(15.25 * 2**30, 275e12, 1.2e12, 2400e9 / 8),
    "TPU v5 lite": Chip(15.75 * 2**30, 197e12, 0.819e12, 1600e9 / 8),
    "TPU v5": Chip(95.74 * 2**30, 459e12, 2.765e12, 4800e9 / 8),
    "TPU v6 lite": Chip(31.25 * 2**30, 918e12, 1.64e12, 3584e9 / 8),
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8}

# The paper presets' architectures (their config.json), for when the checkpoint (gs://) is not readable here.
ARCHITECTURES = {
    "Qwen2.5-7B-Instruct": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=32768),
    "Qwen3-8B": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=False, max_position_embeddings=40960, attention_bias=False),
}


class AotError(ValueError):
  """A topology, model or tool setting this tool cannot use, with the fix."""


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The devices of a TPU topology ("v5e:8x8", "v5p:2x4x4", "v6e:16x16"), compile-only, on a CPU host."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes on this host may hold libtpu
  if importlib.util.find_spec("libtpu") is None:  # the plugin the topology comes from
    raise AotError("libtpu is not installed; pip install -r requirements-tpu.txt (it pins the libtpu that "
                   "compiles with this jax).")
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=num_slices).devices
  except Exception as error:  # libtpu's message names the bad part
    raise AotError(f"--topology={topology!r}: {str(error).splitlines()[0]}; use e.g. v5e:8x8, v5p:2x4x4, "
                   "v6e:16x16.") from None


def model_config(name: str) -> ModelConfig:
  """The architecture of `name`: its config.json when readable here, else a paper preset's known one."""
  known = ARCHITECTURES.get(name.rstrip("/").split("/")[-1])
  if known is not None and (name.startswith("gs://") or not os.path.exists(name)):
    return ModelConfig.from_hf_dict(known, source=name)
  from mcpo_jax.model import resolve_checkpoint
  from mcpo_jax.model.weights import read_config
  return read_config(resolve_checkpoint(name))


def abstract(shape, dtype, mesh: Mesh, logical_axes) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=named_sharding(mesh, logical_axes, shape))


def abstract_model(config: ModelConfig, mesh: Mesh, run: config_lib.RunConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graphdef and its parameters as sharded ShapeDtypeStructs (nothing allocated)."""
  model = abstract_transformer(config, mesh, dtype=jnp.dtype(run.model.dtype),
                               param_dtype=jnp.dtype(run.model.param_dtype), remat=run.model.remat,
                               attention=run.model.attention)
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree.map(lambda v: v.replace(abstract(v.shape, v.dtype, mesh, v.logical_axes)), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, params


def abstract_train_state(params, optimizer, mesh: Mesh, hidden: int, proj_dim: int) -> TrainState:
  replicated = NamedSharding(mesh, PartitionSpec())
  params = {"lm": params, "head": jax.ShapeDtypeStruct((hidden, proj_dim), jnp.float32, sharding=replicated)}
  # Optimizer state laid out as train.init_train_state's eager optax.init lays it out: each moment like its
  # parameter (the one whose path ends the moment's), counters replicated. (Jitting optax.init instead leaves
  # the layout of its zeros to XLA, which on TPU replicated the moments: 2.2 GB per chip for Qwen2.5-7B's embedding.)
  by_path = {path: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  def lay_out(path, leaf):
    param = next((by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path), None)
    sharding = param.sharding if param is not None and param.shape == leaf.shape else replicated
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
  opt_state = jax.tree_util.tree_map_with_path(lay_out, jax.eval_shape(optimizer.init, params))
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  return TrainState(step=scalar, params=params, opt_state=opt_state, nonfinite_streak=scalar)


def abstract_batch(rows: int, prompt: int, response: int, mesh: Mesh) -> TrainBatch:
  """A TrainBatch of `rows` rows as shard_batch places it: rows over the batch axes."""
  def rows_of(*shape, dtype=jnp.int32):
    return abstract((rows,) + shape, dtype, mesh, ("batch",) + (None,) * len(shape))
  return TrainBatch(
      prompt_tokens=rows_of(prompt), prompt_mask=rows_of(prompt), tokens=rows_of(response), mask=rows_of(response),
      old_logp=rows_of(response, dtype=jnp.float32), ref_logp=rows_of(response, dtype=jnp.float32),
      rewards=rows_of(dtype=jnp.float32), correct=rows_of(), advantages=rows_of(dtype=jnp.float32),
      group_ids=rows_of(), domain_ids=rows_of())


@dataclasses.dataclass(frozen=True)
class Program:
  name: str
  lower: Callable[[], jax.stages.Lowered]
  flops: float  # model FLOPs per RL step (all its calls), all chips together
  # A sampler's decode loops (rollout.decode_segments): (steps, that loop's decode step lowered alone) each; the
  # step is compiled on its own and counted `steps` times.
  decode: tuple[tuple[int, Callable[[], jax.stages.Lowered]], ...] = ()
  calls: int = 1  # calls per run of the program (the rollout in rollout.max_rows_per_call chunks); memory is one call's
  per_step: float = 1.0  # runs per RL step, averaged over the run (update: minibatches × epochs; the others: rl_loop's schedule)


def forward_flops(config: ModelConfig, rows: int, new_tokens: int, context: int) -> float:
  """Matmul FLOPs of a forward over `new_tokens` per row attending to `context` keys (2 per multiply-add)."""
  e, h, k, d, f = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
  per_token_layer = 2 * (e * (h + 2 * k) * d + h * d * e + 3 * e * f) + 2 * 2 * h * d * context
  return rows * new_tokens * (config.num_layers * per_token_layer + 2 * e * config.vocab_size)


def programs(run: config_lib.RunConfig, config: ModelConfig, mesh: Mesh) -> list[Program]:
  """The RL loop's jitted programs at the run's shapes (rl_loop.train jits the same functions)."""
  graphdef, params = abstract_model(config, mesh, run)
  compute = jnp.dtype(run.model.dtype)
  reference = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, compute, sharding=s.sharding), params)
  plan = DecodePlan.of(run.rollout)
  with axis_rules(plan.rules):  # what the decode loop reads with rollout.gather_weights (sampling.decode_weights)
    decode_params = jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, compute, sharding=named_sharding(
            mesh, v.logical_axes, v.shape, replicated=DECODE_GATHERED))),
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  optimizer = make_optimizer(run.optim)
  state = abstract_train_state(params, optimizer, mesh, config.hidden_size, run.objective.proj_dim)
  update_config = run.update
  b, g = run.data.prompts_per_step, run.rollout.group_size
  p, t = prompt_bucket(run.data.max_prompt_tokens), run.rollout.max_new_tokens
  rows, minibatch = b * g, b * g // run.train.minibatches
  key = jax.eval_shape(lambda: jax.random.key(0))
  transfer = np.ones((len(run.data.domains),) * 2, np.float32)

  def sampler(name, prompts, group, new_tokens, temperature, plan, calls=1, per_step=1.0):
    program, settings = generate_program(group_size=group, max_new_tokens=new_tokens, temperature=temperature,
                                         top_p=run.rollout.top_p, top_k=run.rollout.top_k, stop_token_ids=(0,),
                                         pad_id=0, plan=plan)
    tokens = abstract((prompts, p), jnp.int32, mesh, ("batch", "length"))
    n = prompts * group

    def kv_cache(rows, slots, dtype=compute):  # [rows, K, slots, D] per layer (int8: and [rows, K, slots] scales)
      shape = (rows, config.num_kv_heads, slots, config.head_dim)
      kv = abstract(shape, dtype, mesh, CACHE_AXES)
      scales = abstract(shape[:3], jnp.float32, mesh, CACHE_AXES[:3]) if dtype == jnp.int8 else None
      return KVCache(layers=(LayerKV(kv, kv, scales, scales),) * config.num_layers,
                     key_mask=abstract((rows, slots), jnp.bool_, mesh, ("batch", "length")),
                     index=abstract((), jnp.int32, mesh, ()))

    def decode_step(visible):  # one token per row against its prompt's keys and the `visible` response slots
      def step(params, token, cache, prompt):
        model = nnx.merge(graphdef, params)
        out = model(token, jnp.ones_like(token), cache=cache, prefix=prompt, return_logits=False)
        return model.logits_from_hidden(out.hidden), out.cache
      weights = decode_params if plan.gather_weights else params
      return jax.jit(axis_rules(plan.rules)(step), donate_argnums=2).lower(
          weights, abstract((n, 1), jnp.int32, mesh, ("batch", None)),
          kv_cache(n, visible, jnp.int8 if plan.int8_cache else compute), kv_cache(prompts, p))

    ends = decode_segment_ends(next_power_of_two(new_tokens), plan.segments)
    segments = [(start, min(end, new_tokens), end) for start, end in zip([0, *ends], ends) if start < new_tokens]
    loops = tuple((end - start, functools.partial(decode_step, visible)) for start, end, visible in segments)
    flops = calls * (forward_flops(config, prompts, p, p) + sum(  # a decode token attends to p + visible keys
        forward_flops(config, n, end - start, p + visible) for start, end, visible in segments))
    return Program(name, lambda: program.lower(graphdef, params, tokens, tokens, key, *settings), flops,
                   loops, calls, per_step)

  train_tokens = p + t  # a row's prompt and response, each forward
  remat = {"none": 1.0, "save_dots": 1.0, "full": 4 / 3}[run.model.remat]  # full: a second forward per backward
  logprobs = jit_sequence_logprobs(graphdef, update_config, run.train.minibatches)
  update = jit_update_step(graphdef, optimizer, update_config, state)
  updates = run.train.minibatches * run.train.epochs
  steps = range(1, run.train.steps + 1)  # rl_loop's schedules: which steps run the diagnostics and evaluations
  diagnoses = sum(bool(run.diag_every) and (s in (1, run.train.steps) or s % run.diag_every == 0) for s in steps)
  evaluations = sum(bool(run.eval.every) and s % run.eval.every == 0 and s < run.train.steps for s in steps)
  evaluations += run.eval.at_start + run.eval.at_end
  eval_rows = min(run.eval.prompts_per_call, run.eval.prompts_per_domain * len(run.data.domains))
  eval_calls = -(-run.eval.prompts_per_domain * len(run.data.domains) // eval_rows)
  per_call = min(b, run.rollout.prompts_per_call or b)  # rollout.max_rows_per_call: one call's prompts
  calls = -(-b // per_call)
  out = [sampler("rollout" if calls == 1 else f"rollout ({calls} calls of {per_call * g} rows)", per_call, g, t,
                 run.rollout.temperature, plan, calls)]
  if run.objective.kl_coef > 0:
    out.append(Program("reference log-probs", lambda: logprobs.lower(reference, abstract_batch(rows, p, t, mesh)),
                       forward_flops(config, rows, train_tokens, train_tokens)))
  if run.train.recompute_old_logp:  # the same pass over the policy's (master) parameters
    out.append(Program("old log-probs", lambda: logprobs.lower(params, abstract_batch(rows, p, t, mesh)),
                       forward_flops(config, rows, train_tokens, train_tokens)))
  out.append(Program("update (one minibatch)", lambda: update.lower(state, abstract_batch(minibatch, p, t, mesh),
                                                                      transfer),
                     3 * remat * forward_flops(config, minibatch, train_tokens, train_tokens), per_step=updates))
  if run.diag_every > 0:
    cosines = gradient_cosines_program(graphdef, update_config, len(run.data.domains), run.train.minibatches)
    out.append(Program("diagnostics", lambda: cosines.lower(state.params, abstract_batch(rows, p, t, mesh), transfer),
                       len(run.data.domains) * 3 * remat * forward_flops(config, rows, train_tokens, train_tokens),
                       per_step=diagnoses / run.train.steps))
  # An evaluation is eval_calls sampler calls of eval_rows prompts; the run makes `evaluations` of them.
  per_eval = dict(calls=eval_calls, per_step=evaluations / run.train.steps)
  out.append(sampler("eval (greedy)", eval_rows, 1, run.eval.max_new_tokens, 0.0, plan.exact(), **per_eval))
  if run.eval.k > 0:
    out.append(sampler(f"eval (k={run.eval.k})", eval_rows, run.eval.k, run.eval.max_new_tokens,
                       run.rollout.temperature, plan.exact(), **per_eval))
  return out


@dataclasses.dataclass(frozen=True)
class Report:
  name: str
  arguments: float  # bytes per chip
  outputs: float
  temporaries: float
  aliased: float
  flops: float  # per chip
  hbm_traffic: float  # bytes per chip, a lower bound
  ici_traffic: float  # bytes per chip the collectives produce, a lower bound (see collective_bytes)
  compile_s: float

  @property
  def total(self) -> float:
    return self.arguments + self.outputs + self.temporaries - self.aliased


def extrapolate(shallow: Report, deep: Report, depths: Sequence[int], full_depth: int, program: Program,
                chips: int) -> Report:
  """`program` (the full model's, `full_depth` layers) from compiles of it cut to depths[0] and depths[1] layers:
  per-chip memory and HBM/ICI traffic grow linearly with the unrolled layers (each adds the same weights,
  optimizer state, saved activations and reads), so each is the line through the two, read at the full depth;
  FLOPs come from the full model's shapes."""
  at = lambda a, b: a + (b - a) * (full_depth - depths[0]) / (depths[1] - depths[0])
  fields = ("arguments", "outputs", "temporaries", "aliased", "hbm_traffic", "ici_traffic")
  return dataclasses.replace(shallow, name=program.name, flops=program.flops / chips,
                             compile_s=shallow.compile_s + deep.compile_s,
                             **{f: at(getattr(shallow, f), getattr(deep, f)) for f in fields})


def collective_bytes(hlo_text: str) -> float:
  """Bytes per chip that the compiled program's collectives produce (each counted once, loop bodies once):
  the result of every synchronous collective and of every async one's `-done`. A chip receives about this
  much over its links, so bytes / ICI bandwidth bounds the time the collectives take."""
  ops = "|".join(COLLECTIVES)
  total = 0
  for line in hlo_text.splitlines():
    match = re.search(rf"= (.+?) (?:{ops})(?:-done)?\(", line)
    if match:
      total += sum(HLO_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                   for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)))
  return float(total)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost) or {}


def analyze(program: Program, chips: int) -> Report:
  """Compiles one program for the mesh's chips and reads XLA's per-chip memory plan."""
  started = time.perf_counter()
  compiled = program.lower().compile()
  memory = compiled.memory_analysis()
  traffic, ici = float(_cost(compiled).get("bytes accessed", 0.0)), collective_bytes(compiled.as_text())
  for steps, lower_step in program.decode:  # the prefill and each loop's body once, plus its other steps' reads
    step = lower_step().compile()
    traffic += (steps - 1) * step.memory_analysis().argument_size_in_bytes
    ici += (steps - 1) * collective_bytes(step.as_text())
  return Report(program.name, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                memory.temp_size_in_bytes, memory.alias_size_in_bytes, program.flops / chips,
                traffic * program.calls, ici * program.calls, time.perf_counter() - started)


def table_header(chip: Chip, chip_name: str) -> str:
  return "\n".join([
      f"per chip ({chip_name}: {chip.hbm_bytes / GB:.2f} GB HBM, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
      f"{chip.hbm_bandwidth / 1e12:.2f} TB/s HBM, {chip.ici_bandwidth / 1e9:.0f} GB/s ICI)", "",
      "| program | arguments GB | outputs GB | temporaries GB | total GB | HBM used | fits | TFLOP | ICI GB | "
      "bound s | bound by | MFU bound | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"])


def resource_times(r: Report, chip: Chip) -> dict[str, float]:
  """Seconds per run of the program if each resource alone limited it, at the chip's peak figures."""
  return {"compute": r.flops / chip.peak_flops, "HBM": r.hbm_traffic / chip.hbm_bandwidth,
          "ICI": r.ici_traffic / chip.ici_bandwidth}


def table_row(r: Report, chip: Chip, headroom: float) -> tuple[str, bool]:
  """A Markdown row, and whether the program fits with `headroom` of the chip's HBM to spare."""
  used = r.total / chip.hbm_bytes
  fits = used <= 1 - headroom
  times = resource_times(r, chip)
  limit = max(times, key=times.get)
  bound = times[limit]
  return (f"| {r.name} | {r.arguments / GB:.2f} | {r.outputs / GB:.2f} | {r.temporaries / GB:.2f} | "
          f"{r.total / GB:.2f} | {used:.0%} | {'yes' if fits else '**no**'} | {r.flops / 1e12:.2f} | "
          f"{r.ici_traffic / GB:.2f} | {bound:.3g} | {limit} | {times['compute'] / bound if bound else 0:.2f} | "
          f"{r.compile_s:.0f} |"), fits


def step_line(runs: list[tuple[float, Report]], chip: Chip) -> str:
  """The RL step's lower bound: each program's bound times its runs per step (Program.per_step), summed,
  as programs run one after another; and the MFU bound, the step's compute time at peak over that."""
  bound = sum(n * max(resource_times(r, chip).values()) for n, r in runs)
  compute = sum(n * resource_times(r, chip)["compute"] for n, r in runs)
  parts = " + ".join(f"{n:.3g} × {r.name}" for n, r in runs)
  return f"RL step ({parts}): bound {bound:.4g} s, compute {compute:.4g} s, MFU bound {compute / bound:.2f}"


def main(argv) -> None:
  del argv
  options = flags.FLAGS
  from mcpo_jax.console import quiet_libraries
  quiet_libraries()
  set_tpu_flags()  # before topology_devices loads libtpu
  try:
    run = config_lib.build(options.config)
    devices = topology_devices(options.topology, options.num_slices)
    chip_name = devices[0].device_kind
    if chip_name not in CHIPS:
      raise AotError(f"--topology={options.topology}: chip {chip_name!r} has no HBM/peak figures here; known: "
                     f"{', '.join(CHIPS)}.")
    mesh = make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices=devices)
    config_lib.check_micro_batch_sharding(run, mesh)
    config = model_config(run.model.name)
    if options.layers:  # a quick look: what grows with depth (weights, optimizer state, saved activations) shrinks
      config = dataclasses.replace(config, num_layers=options.layers)
    config.validate_for_mesh(mesh.shape["tensor"])
    depths = [int(d) for d in options.extrapolate_from]
    if depths and (len(depths) != 2 or not 0 < depths[0] < depths[1] <= config.num_layers):
      raise AotError(f"--extrapolate_from={','.join(options.extrapolate_from)}: give two depths, shallow then deep, "
                     f"between 1 and the model's {config.num_layers} layers, e.g. 2,4.")
    select = lambda config: [p for p in programs(run, config, mesh)
                             if not options.programs or p.name.startswith(tuple(options.programs))]
    todo = select(config)
    cut = [select(dataclasses.replace(config, num_layers=depth)) for depth in depths]  # [shallow, deep] programs
  except (config_lib.ConfigError, AotError, ValueError) as error:
    sys.exit(f"error: {error}")
  how = (f", {' and '.join(options.extrapolate)} extrapolated from compiles at {depths[0]} and {depths[1]} layers"
         if depths else "")
  print(f"{run.model.name} ({config.num_params / 1e9:.2f}B parameters, {config.num_layers} layers{how}) on "
        f"{options.topology} × {options.num_slices} slice(s) = {len(devices)} chips, mesh {dict(mesh.shape)}",
        flush=True)
  shares = host_read_shares(config, mesh)
  print(f"loading: each of {len(shares)} hosts reads {max(shares.values()):.2f} of the checkpoint "
        f"({config.num_params * 2 * max(shares.values()) / 1e9:.1f} GB of a bf16 checkpoint)", flush=True)
  chip = CHIPS[chip_name]
  fits_all, runs, chips = True, [], math.prod(mesh.devices.shape)
  for i, program in enumerate(todo):
    print(f"compiling {program.name} ({i + 1}/{len(todo)})...", flush=True)
    try:
      if depths and program.name.startswith(tuple(options.extrapolate)):
        shallow, deep = (analyze(programs_at[i], chips) for programs_at in cut)
        report = extrapolate(shallow, deep, depths, config.num_layers, program, chips)
        report = dataclasses.replace(report, name=f"{program.name}, extrapolated")
      else:
        report = analyze(program, chips)
      row, fits = table_row(report, chip, options.headroom)
      runs.append((program.per_step, report))
    except jax.errors.JaxRuntimeError as error:  # XLA:TPU refuses a program that cannot fit in HBM
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      row, fits = f"| {program.name} | does not compile: {str(error).splitlines()[0][:200]} |", False
    fits_all &= fits
    print((table_header(chip, chip_name) + "\n" if i == 0 else "") + row, flush=True)
  if runs:
    print("\n" + step_line(runs, chip) + ("" if len(runs) == len(todo) else " (of the programs that compiled)"))
  if not fits_all:
    sys.exit(f"error: a program leaves less than {options.headroom:.0%} of HBM free; see the table.")

def _define_flags() -> None:  # only when run as a program: importing this module defines no absl flags
  define_config("configs/multi_domain.py", "The run's config (and overrides).")
  flags.DEFINE_string("topology", "v5e:8x8", "TPU topology: v5e:8x8, v5p:2x4x4, v6e:16x16, ...")
  flags.DEFINE_integer("num_slices", 1, "Slices joined by the data-centre network (multi-slice).")
  flags.DEFINE_float("headroom", 0.10, "Share of HBM each program must leave free.")
  flags.DEFINE_list("programs", [], "Compile only the programs whose names start with these.")
  flags.DEFINE_integer("layers", 0, "Compile the model cut to this many layers (0: all): minutes instead of hours on a "
                       "small host, to find what dominates; per-chip memory that grows with depth is then understated.")
  flags.DEFINE_list("extrapolate_from", [], "Two depths, e.g. 2,4: compile the --extrapolate programs cut to those many "
                    "layers and report them at the full depth, memory and traffic extrapolated linearly (the full 7B "
                    "update needs ~15 GB of host memory and 20 minutes to compile on 2 cores).")
  flags.DEFINE_list("extrapolate", ["update", "diagnostics"], "With --extrapolate_from: the programs (name prefixes) "
                    "to extrapolate; the others compile at full depth.")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=parse_flags)
