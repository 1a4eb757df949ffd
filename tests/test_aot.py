"""mcpo_jax.aot: the RL loop's programs compile from abstract shapes, and the tool's table is XLA's memory plan.

With libtpu installed (requirements-test.txt) a 2-layer model's programs compile for v5e:2x2 and
v5p:2x2x1 with XLA:TPU on this CPU host; without it those tests skip with the reason and the CPU
test of the same code still runs.
"""

import collections
import dataclasses
import importlib.util

import jax
import pytest
from conftest import tiny_pod_run

from mcpo_jax import aot
from mcpo_jax import config as config_lib
from mcpo_jax.mesh import make_mesh
from mcpo_jax.sampling import next_power_of_two, prompt_bucket
from configs.multi_domain import get_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install -r requirements-tpu.txt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return tiny_pod_run(tmp_path_factory, "tiny_qwen2")


def _check_reports_equal_memory_analysis(run, mesh, names):
  programs = {p.name: p for p in aot.programs(run, aot.model_config(run.model.name), mesh)}
  assert set(names) <= set(programs), sorted(programs)
  for name in names:
    # conftest's "highest" matmul precision would ask the splash kernel (TPU) for an fp32 contraction of bf16
    # operands, which Mosaic rejects; runs keep JAX's default.
    with jax.default_matmul_precision("default"):
      report = aot.analyze(programs[name], mesh.devices.size)
      memory = programs[name].lower().compile().memory_analysis()
    assert (report.arguments, report.outputs, report.temporaries, report.aliased) == (
        memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes,
        memory.alias_size_in_bytes), name
    assert report.total > 0 and report.flops > 0 and report.hbm_traffic > 0


def test_programs_compile_on_the_cpu_mesh_and_the_report_is_their_memory_plan(run):
  _check_reports_equal_memory_analysis(run, make_mesh(1, -1, 1), ["rollout", "update (one minibatch)"])


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_rollout_reference_and_update_compile_for_tpu(run, topology):
  devices = aot.topology_devices(topology)
  assert devices[0].platform == "tpu" and devices[0].device_kind in aot.CHIPS
  mesh = make_mesh(1, -1, 1, devices=devices)
  _check_reports_equal_memory_analysis(run, mesh, ["rollout", "reference log-probs", "update (one minibatch)"])


def test_rollout_in_bounded_calls_plans_one_calls_memory(run):
  """rollout.max_rows_per_call: the compiled sampler holds one call's rows (a smaller KV cache), and the step's
  FLOPs and HBM traffic count every call."""
  mesh = make_mesh(1, -1, 1)
  whole = next(p for p in aot.programs(run, aot.model_config(run.model.name), mesh) if p.name.startswith("rollout"))
  chunked_run = dataclasses.replace(run, rollout=dataclasses.replace(run.rollout, max_rows_per_call=8))  # 16 rows
  chunked = next(p for p in aot.programs(chunked_run, aot.model_config(run.model.name), mesh)
                 if p.name.startswith("rollout"))
  assert whole.name == "rollout" and chunked.name == "rollout (2 calls of 8 rows)" and chunked.calls == 2
  assert chunked.flops == whole.flops
  one, two = aot.analyze(whole, mesh.devices.size), aot.analyze(chunked, mesh.devices.size)
  assert two.arguments + two.outputs + two.temporaries < one.arguments + one.outputs + one.temporaries
  assert two.hbm_traffic > 0.5 * one.hbm_traffic  # both calls' reads, not one's


def test_the_table_says_which_program_does_not_fit():
  chip = aot.Chip(hbm_bytes=10e9, peak_flops=1e12, hbm_bandwidth=1e12, ici_bandwidth=1e11)
  small = aot.Report("small", 2e9, 1e9, 5e9, 1e9, flops=2e12, hbm_traffic=1e12, ici_traffic=1e11,
                     compile_s=1.0)  # 7 GB: 70%
  large = aot.Report("large", 2e9, 1e9, 7.5e9, 1e9, flops=1e12, hbm_traffic=3e12, ici_traffic=1e11,
                     compile_s=1.0)  # 9.5 GB: 95%
  chatty = aot.Report("chatty", 2e9, 1e9, 5e9, 1e9, flops=1e12, hbm_traffic=1e12, ici_traffic=4e11, compile_s=1.0)
  small_row, small_fits = aot.table_row(small, chip, headroom=0.10)
  large_row, large_fits = aot.table_row(large, chip, headroom=0.10)
  assert small_fits and not large_fits
  assert "| 7.00 | 70% | yes | 2.00 | 100.00 | 2 | compute | 1.00 |" in small_row  # 2 s of compute: MFU bound 1
  assert "| 9.50 | 95% | **no** | 1.00 | 100.00 | 3 | HBM | 0.33 |" in large_row  # 3 s of HBM traffic
  assert "| 400.00 | 4 | ICI | 0.25 |" in aot.table_row(chatty, chip, headroom=0.10)[0]  # 4 s over the links
  assert aot.table_row(large, chip, headroom=0.0)[1]  # fits when nothing need be left free


def test_the_abstract_train_state_is_laid_out_as_the_real_one(run):
  """The update's arguments are the train state: aot's abstract one must have init_train_state's shapes, dtypes
  and shardings, optimizer moments included (eager optax.init keeps each parameter's sharding)."""
  import jax.numpy as jnp
  from mcpo_jax.model import init_model
  from mcpo_jax.train import init_train_state, make_optimizer

  mesh, config = make_mesh(1, 2, 4), aot.model_config(run.model.name)
  optimizer = make_optimizer(run.optim)
  graphdef, params = aot.abstract_model(config, mesh, run)
  abstract = aot.abstract_train_state(params, optimizer, mesh, config.hidden_size, run.objective.proj_dim)
  model = init_model(config, mesh=mesh, dtype=jnp.dtype(run.model.dtype), param_dtype=jnp.dtype(run.model.param_dtype))
  _, real = init_train_state(model, optimizer, proj_dim=run.objective.proj_dim)
  pairs = list(zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(real), strict=True))
  sharded = 0
  for (path, want), got in pairs:
    assert (want.shape, want.dtype) == (got.shape, got.dtype), jax.tree_util.keystr(path)
    assert want.sharding.is_equivalent_to(got.sharding, got.ndim), (jax.tree_util.keystr(path), want.sharding,
                                                                    got.sharding)
    sharded += "opt_state" in jax.tree_util.keystr(path) and got.sharding.spec != jax.sharding.PartitionSpec()
  assert sharded > 0  # moments really are sharded: the check can fail


def test_extrapolation_reads_each_figure_off_the_line_through_two_depths():
  """--extrapolate_from: memory and traffic at the full depth from compiles at two shallower ones; FLOPs are the
  full program's, per chip."""
  at2 = aot.Report("x", 1e9, 0.5e9, 2e9, 0.5e9, flops=1.0, hbm_traffic=10e9, ici_traffic=1e9, compile_s=3.0)
  at4 = aot.Report("x", 2e9, 1.0e9, 3e9, 1.0e9, flops=2.0, hbm_traffic=14e9, ici_traffic=1e9, compile_s=5.0)
  full = aot.Program("update", lambda: None, flops=64e12)
  report = aot.extrapolate(at2, at4, [2, 4], 28, full, chips=64)
  assert (report.name, report.flops, report.compile_s) == ("update", 1e12, 8.0)
  assert (report.arguments, report.outputs, report.temporaries, report.aliased) == (14e9, 7e9, 15e9, 7e9)
  assert (report.hbm_traffic, report.ici_traffic) == (62e9, 1e9)


def test_the_rl_step_sums_each_programs_bound_times_its_runs_per_step():
  chip = aot.Chip(hbm_bytes=10e9, peak_flops=1e12, hbm_bandwidth=1e12, ici_bandwidth=1e11)
  rollout = aot.Report("rollout", 1e9, 0, 1e9, 0, flops=1e12, hbm_traffic=4e12, ici_traffic=0, compile_s=1.0)  # 4 s
  update = aot.Report("update", 1e9, 0, 1e9, 0, flops=2e12, hbm_traffic=1e12, ici_traffic=0, compile_s=1.0)  # 2 s
  line = aot.step_line([(1, rollout), (4, update), (0.5, rollout)], chip)
  # 4 + 4 × 2 + 0.5 × 4 = 14 s bound; compute 1 + 4 × 2 + 0.5 × 1 = 9.5 s
  assert line.endswith("bound 14 s, compute 9.5 s, MFU bound 0.68"), line
  assert "1 × rollout + 4 × update + 0.5 × rollout" in line


def test_programs_run_as_often_per_step_as_the_rl_loop_runs_them(run):
  """update: minibatches × epochs per step; diagnostics at the first, every N-th and last step; evaluation at
  the start, every N steps before the last, and the end, each in calls of at most 64 prompts."""
  run = dataclasses.replace(run, diag_every=2, train=dataclasses.replace(run.train, steps=10, minibatches=2, epochs=3),
                            eval=dataclasses.replace(run.eval, every=4, prompts_per_domain=30))
  programs = aot.programs(run, aot.model_config(run.model.name), make_mesh(1, -1, 1))
  per_step, calls = {p.name: p.per_step for p in programs}, {p.name: p.calls for p in programs}
  assert per_step["update (one minibatch)"] == 6
  assert per_step["diagnostics"] == 6 / 10  # steps 1 (the first), 2, 4, 6, 8 and 10
  assert per_step["eval (greedy)"] == per_step["eval (k=2)"] == 4 / 10  # start, steps 4 and 8, end
  assert calls["eval (greedy)"] == -(-30 * len(run.data.domains) // 64)


def test_collective_bytes_counts_what_the_collectives_produce():
  """An all-gather of an [8, 1024] float32 array sharded 8 ways: each chip ends with all 32 KiB; an
  all-reduce of [256] float32 produces 1 KiB per chip. Elementwise work adds nothing."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = make_mesh(1, 8, 1)
  x = jax.device_put(jnp.ones((8, 1024), jnp.float32), NamedSharding(mesh, PartitionSpec("fsdp")))
  gather = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, PartitionSpec()))
  assert aot.collective_bytes(gather.lower(x).compile().as_text()) == 8 * 1024 * 4
  y = jax.device_put(jnp.ones((8, 256), jnp.float32), NamedSharding(mesh, PartitionSpec("fsdp")))
  total = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, PartitionSpec()))
  assert aot.collective_bytes(total.lower(y).compile().as_text()) == 256 * 4
  assert aot.collective_bytes(jax.jit(lambda a: a + 1).lower(x).compile().as_text()) == 0


@needs_libtpu
def test_gathered_weights_take_the_decode_loop_off_the_links(run):
  """v5e:2x2 with FSDP over 4 chips: rollout.gather_weights leaves the decode steps without weight
  all-gathers, so the rollout's ICI bytes fall by at least the decode steps' share of the weights."""
  mesh = make_mesh(1, -1, 1, devices=aot.topology_devices("v5e:2x2"))
  reports = {}
  for gather in (False, True):
    gathered = dataclasses.replace(run, rollout=dataclasses.replace(run.rollout, gather_weights=gather))
    rollout = next(p for p in aot.programs(gathered, aot.model_config(run.model.name), mesh) if p.name == "rollout")
    with jax.default_matmul_precision("default"):
      reports[gather] = aot.analyze(rollout, mesh.devices.size)
  config = aot.model_config(run.model.name)
  weights_per_step = config.num_params * 2 * 3 / 4  # bf16, the 3 of 4 shards a chip lacks, roughly
  saved = reports[False].ici_traffic - reports[True].ici_traffic
  decode_steps = sum(steps for steps, _ in rollout.decode)
  assert saved > 0.5 * (decode_steps - 1) * weights_per_step, (reports, weights_per_step)


@needs_libtpu
def test_decode_segments_read_only_the_filled_cache(run):
  """v5e:2x2, 1024 new tokens: with rollout.decode_segments=4 each decode loop attends over the response slots
  filled by its end: the rollout's HBM traffic falls by the cache reads the segments skip (computed from the
  shapes), within 10%. (Loops of 256 slots: XLA:TPU pads this model's cache slots to multiples of 128.)"""
  run = dataclasses.replace(run, rollout=dataclasses.replace(run.rollout, max_new_tokens=1024))
  config, mesh = aot.model_config(run.model.name), make_mesh(1, -1, 1, devices=aot.topology_devices("v5e:2x2"))
  reports = {}
  for segments in (1, 4):
    segmented = dataclasses.replace(run, rollout=dataclasses.replace(run.rollout, decode_segments=segments))
    rollout = next(p for p in aot.programs(segmented, config, mesh) if p.name == "rollout")
    assert len(rollout.decode) == segments
    with jax.default_matmul_precision("default"):
      reports[segments] = aot.analyze(rollout, mesh.devices.size)
  rows = run.data.prompts_per_step * run.rollout.group_size
  slot_bytes = rows * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2 / mesh.devices.size  # bf16 k, v
  skipped = sum(256 * (1024 - 256 * j) for j in range(1, 4)) * slot_bytes  # loop j (of 4, 256 steps) skips 1024 - 256j
  saved = reports[1].hbm_traffic - reports[4].hbm_traffic
  assert 0.9 * skipped < saved < 1.1 * skipped, (saved, skipped)  # measured 0.97: the extra loop bodies count once


@needs_libtpu
def test_a_decode_step_reads_each_prompts_keys_once_not_once_per_row(run):
  """v5e:2x2: the decode step the tool compiles takes the prompts' keys as [prompts, K, P, D] per layer and the
  rows' own slots as [rows, K, T, D]; no argument holds a row's copy of its prompt ([rows, K, P + T, D])."""
  config, mesh = aot.model_config(run.model.name), make_mesh(1, -1, 1, devices=aot.topology_devices("v5e:2x2"))
  rollout = next(p for p in aot.programs(run, config, mesh) if p.name == "rollout")
  prompts, rows = run.data.prompts_per_step, run.data.prompts_per_step * run.rollout.group_size
  p, t = prompt_bucket(run.data.max_prompt_tokens), next_power_of_two(run.rollout.max_new_tokens)
  k, d = config.num_kv_heads, config.head_dim
  shapes = collections.Counter(leaf.shape for leaf in jax.tree.leaves(rollout.decode[0][1]().in_avals))
  assert shapes[(prompts, k, p, d)] == shapes[(rows, k, t, d)] == 2 * config.num_layers, shapes
  assert (rows, k, p + t, d) not in shapes


@needs_libtpu
def test_an_int8_cache_halves_the_cache_bytes_a_decode_step_reads(run):
  """v5e:2x2, rollout.kv_cache="int8": the decode step's own slots are int8 [rows, K, T, D] with float32 scales
  [rows, K, T] (its arguments shrink by exactly D − 4 bytes per slot and head of keys and of values, per layer; per
  chip, XLA:TPU pads this tiny model's arrays to its tiles, so there they only shrink), it compiles for XLA:TPU, the evaluation still decodes from the compute-dtype cache, and the step gains the
  teacher-forced π_old pass."""
  mesh = make_mesh(1, -1, 1, devices=aot.topology_devices("v5e:2x2"))
  config = aot.model_config(run.model.name)
  rows, t = run.data.prompts_per_step * run.rollout.group_size, next_power_of_two(run.rollout.max_new_tokens)
  step_bytes, names = {}, {}
  for cache in ("compute", "int8"):
    settings = dataclasses.replace(run, rollout=dataclasses.replace(run.rollout, kv_cache=cache),
                                   train=dataclasses.replace(run.train, recompute_old_logp=cache == "int8"))
    programs = {p.name: p for p in aot.programs(settings, config, mesh)}
    names[cache] = set(programs)
    step = programs["rollout"].decode[0][1]()
    shapes = collections.Counter((leaf.shape, str(leaf.dtype)) for leaf in jax.tree.leaves(step.in_avals))
    if cache == "int8":
      k, d = config.num_kv_heads, config.head_dim
      assert shapes[((rows, k, t, d), "int8")] == shapes[((rows, k, t), "float32")] == 2 * config.num_layers, shapes
      eval_step = programs["eval (greedy)"].decode[0][1]()
      assert not any(leaf.dtype == jax.numpy.int8 for leaf in jax.tree.leaves(eval_step.in_avals))
    logical = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(step.in_avals))
    step_bytes[cache] = logical, step.compile().memory_analysis().argument_size_in_bytes
  assert names["int8"] - names["compute"] == {"old log-probs"}
  saved = 2 * config.num_layers * rows * config.num_kv_heads * t * (config.head_dim * 2 - (config.head_dim + 4))
  assert step_bytes["compute"][0] - step_bytes["int8"][0] == saved, (step_bytes, saved)
  assert step_bytes["int8"][1] < step_bytes["compute"][1]  # per chip, in XLA:TPU's tiled layouts


@needs_libtpu
def test_mlp_over_fsdp_splits_the_decode_steps_mlp_weights_over_fsdp_and_tensor(run):
  """v5e:2x2 as fsdp 2 × tensor 2, weights gathered per call: with rollout.mlp_over_fsdp a decode step reads
  1/4 of the bf16 MLP weights instead of 1/2 (its arguments shrink by exactly the difference), and the whole
  rollout still compiles for XLA:TPU."""
  mesh = make_mesh(1, 2, 2, devices=aot.topology_devices("v5e:2x2"))
  config = aot.model_config(run.model.name)
  step_bytes = {}
  for split in (False, True):
    rollout_settings = dataclasses.replace(run.rollout, gather_weights=True, mlp_over_fsdp=split)
    rollout = next(p for p in aot.programs(dataclasses.replace(run, rollout=rollout_settings), config, mesh)
                   if p.name == "rollout")
    with jax.default_matmul_precision("default"):
      step_bytes[split] = rollout.decode[0][1]().compile().memory_analysis().argument_size_in_bytes
      if split:
        assert rollout.lower().compile().memory_analysis().temp_size_in_bytes > 0
  mlp_bytes = config.num_layers * 3 * config.hidden_size * config.intermediate_size * 2  # bf16 gate, up, down
  assert step_bytes[False] - step_bytes[True] == mlp_bytes / 2 - mlp_bytes / 4, (step_bytes, mlp_bytes)


@needs_libtpu
def test_unknown_topology_is_one_clear_error():
  with pytest.raises(aot.AotError, match="--topology='v9z:1x1'"):
    aot.topology_devices("v9z:1x1")


def test_the_paper_presets_architectures_are_known_without_their_checkpoint():
  for preset, params in (("qwen2.5-7b-instruct", 7.6e9), ("qwen3-8b", 8.2e9)):
    config = aot.model_config(get_config(preset).model.name)
    assert abs(config.num_params - params) / params < 0.02, (preset, config.num_params)
  assert jax.devices()[0].platform == "cpu"


@needs_libtpu
def test_a_micro_batch_that_does_not_cover_the_batch_shards_is_one_clear_error(run):
  mesh = make_mesh(1, -1, 1, devices=aot.topology_devices("v5e:2x2"))  # 4 batch shards
  config_lib.check_micro_batch_sharding(run, mesh)  # 4 prompts × 4 rows / 2 micro-batches = 8 rows: fine
  odd = dataclasses.replace(run, train=dataclasses.replace(run.train, micro_batches=4))  # 4 rows: fine
  config_lib.check_micro_batch_sharding(odd, mesh)
  odd = dataclasses.replace(run, rollout=dataclasses.replace(run.rollout, group_size=3))  # 6 rows per micro-batch
  with pytest.raises(config_lib.ConfigError, match=r"micro_batches=2: a micro-batch of 6 rows .* 4 batch-sharding"):
    config_lib.check_micro_batch_sharding(odd, mesh)
  config_lib.check_micro_batch_sharding(odd, make_mesh(1, -1, 1))  # CPU: replicated, allowed


def test_a_paper_preset_takes_a_slice_layout():
  v6e = get_config("qwen3-8b@v6e-256")
  assert (v6e.mesh.data, v6e.mesh.fsdp, v6e.mesh.tensor) == (16, 4, 4) and v6e.rollout.mlp_over_fsdp
  assert v6e.train.micro_batches == 8 and v6e.rollout.max_rows_per_call == 0 and v6e.preset == "qwen3-8b@v6e-256"
  assert v6e.eval.prompts_per_call == 3 * v6e.eval.prompts_per_domain  # the whole evaluation in one call
  assert v6e.rollout.kv_cache == "int8" and v6e.train.recompute_old_logp  # Qwen3-8B's own addition there
  assert get_config("qwen2.5-7b-instruct@v6e-256").rollout.kv_cache == "compute"
  config_lib.build(v6e)  # a valid run
  assert get_config("qwen2.5-7b-instruct@v5p-64").to_dict() == dict(get_config("qwen2.5-7b-instruct").to_dict(),
                                                                   preset="qwen2.5-7b-instruct@v5p-64")
  for bad in ("qwen3-8b@v6e-255", "tiny@v6e-256"):
    with pytest.raises(ValueError, match="takes one of: @v5e-64, @v5p-64, @v6e-256"):
      get_config(bad)


def test_the_evaluation_compiles_in_calls_of_eval_prompts_per_call(run):
  total = run.eval.prompts_per_domain * len(run.data.domains)
  for per_call in (1, total):
    split = dataclasses.replace(run, eval=dataclasses.replace(run.eval, prompts_per_call=per_call))
    evals = [p for p in aot.programs(split, aot.model_config(run.model.name), make_mesh(1, -1, 1))
             if p.name.startswith("eval")]
    assert evals and all(p.calls == -(-total // per_call) for p in evals), [(p.name, p.calls) for p in evals]
