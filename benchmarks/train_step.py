#!/usr/bin/env python
"""One RL update (forward + backward + optimizer) on CPU: mcpo_jax's update step vs google-tunix 0.1.7.

SmolLM2-135M dimensions (random weights), float32, B·G = 32 rows (4 prompts × 8 rollouts, 3 domains),
64-token prompts (left padded, ragged), T-token responses (right padded, ragged), rewards in {0, 1}.

  ours:  mcpo_jax.train.jit_update_step (algorithm "mcpo": the contrastive head included; and "grpo"),
         global-norm clip + AdamW, the state donated, on a 1-device mesh as in rl_loop, at each of
         --micro_batches (gradient accumulation: the shipped knob that bounds activation memory; the
         first value is the one RESULT reports and the longer T run).
  tunix: tunix.rl.algo_core.grpo_loss_fn on a tunix Llama3 of the same dimensions, nnx.value_and_grad,
         then nnx.Optimizer(global-norm clip + AdamW).update, the whole step under nnx.jit with the
         optimizer donated: what tunix's PeftTrainer._train_step does for GRPOLearner. Its default
         RematConfig.NONE first; RematConfig.BLOCK if that does not fit.

Every engine/config runs in its own subprocess; its peak RSS (getrusage ru_maxrss) is reported as
the total and as the delta over the RSS peak right after model init. Each step is compiled ahead of
time and not run when XLA's memory plan already passes --mem_cap_gb; a parent thread watches each
worker's RSS and the machine's MemAvailable and kills the worker (reported as "does not fit") past
--mem_cap_gb or when less than --mem_reserve_gb would be left, so that a step that does not fit
fails cleanly instead of taking the machine (and the work running next to it) down.

Throughput: tokens/s = N·(P + T) / median wall time of --repeats updates after one warm-up
(prompt + response positions, all padded positions counted; response-only N·T / time too).
Fraction of the matmul bound: 6 · params · (positions the update computes) FLOPs over this CPU's
measured float32 jnp.dot 2048² FLOP/s (params = matmul params, the tied LM head counted once). The
unshared update computes N·(P + T) positions; the shared-prefix one B·P + N·T (each prompt once), so
at equal tok/s it is further from the bound: tok/s compares the two, "of bound" how busy the CPU is.

  python benchmarks/train_step.py                          # everything (~25 min on 2 cores)
  python benchmarks/train_step.py --lengths=128 --algorithms=mcpo          # the RESULT line only
  python benchmarks/train_step.py --peers= --micro_batches=4 --lengths=128 --algorithms=mcpo --breakdown
  python benchmarks/train_step.py --num_layers=2 --lengths=32,64 --peer_length=32 --repeats=1  # smoke

The last line is `RESULT vs_tunix=<x> frac_of_matmul_peak=<y>`: x = our tok/s over tunix's at
T = 128 (algorithm mcpo), y = our fraction of the matmul bound at T = 128 (mcpo), both at the
first of --micro_batches; the lines before it give the same for the other values.
tunix lives in its own venv (benchmarks/README.md); its worker runs under --tunix_python
(default /tmp/bench-venv/bin/python when it exists).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for path in (str(REPO), str(HERE)):
  if path not in sys.path:
    sys.path.insert(0, path)

from sampler import SMOLLM2, cpu_cores, cpu_model, matmul_params, worker_matmul  # noqa: E402  (benchmarks/sampler.py)

# Batch shapes: (prompts, rollouts per prompt, prompt bucket). "bench" is the peer comparison's; "default-run"
# is what `python run.py --config=configs/multi_domain.py` updates on (3 × 6 rows, ~96-128-token chat prompts).
SHAPES = {"bench": (4, 8, 64), "default-run": (3, 6, 128)}
PROMPT_LEN, ROWS, GROUP = 64, 32, 8  # set by use_shape
DOMAINS = 3
RESULT_TAG = "BENCH_JSON "
DEFAULT_TUNIX_PYTHON = "/tmp/bench-venv/bin/python"
INSTALL_HINT = ("python -m venv --system-site-packages /tmp/bench-venv && /tmp/bench-venv/bin/pip install "
                "--no-deps -r benchmarks/requirements.txt (see benchmarks/README.md)")


def use_shape(name: str) -> None:
  """Sets the module's batch shape (the parent and each worker process call it with the same name)."""
  global PROMPT_LEN, ROWS, GROUP
  prompts, GROUP, PROMPT_LEN = SHAPES[name]
  ROWS = prompts * GROUP


def log(*parts) -> None:
  print(*parts, file=sys.stderr, flush=True)


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def dims(spec: dict) -> dict:
  """SmolLM2-135M dimensions, with spec["num_layers"] (a quick smoke run) if given."""
  return dict(SMOLLM2, num_layers=spec.get("num_layers") or SMOLLM2["num_layers"])


def params_of(num_layers: int) -> tuple[int, int, int]:
  """(non-embedding matmul params, LM-head params, total) as benchmarks/sampler.py counts them."""
  body, head, _ = matmul_params()
  body = body * num_layers // SMOLLM2["num_layers"]
  return body, head, body + head


def make_batch(response_len: int, seed: int = 0) -> dict:
  """The same scored rollouts for every engine (NumPy): ragged prompts (left padded with id 0) and
  responses (right padded with id 0), random old/ref log-probs, rewards in {0, 1}, GRPO advantages."""
  import numpy as np
  rng = np.random.default_rng(seed + response_len)
  n, p, t, v = ROWS, PROMPT_LEN, response_len, SMOLLM2["vocab_size"]
  prompt_lens = np.repeat(rng.integers(p // 2, p + 1, n // GROUP), GROUP)  # the rows of a prompt share it
  prompt_lens[::GROUP] = p  # and one prompt at full length
  prompt_mask = (np.arange(p)[None] >= (p - prompt_lens)[:, None]).astype(np.int32)
  prompt_tokens = np.repeat(rng.integers(1, v, (n // GROUP, p)), GROUP, axis=0).astype(np.int32) * prompt_mask
  response_lens = rng.integers(t // 4, t + 1, n)
  response_lens[0] = t  # at least one row fills T
  mask = (np.arange(t)[None] < response_lens[:, None]).astype(np.int32)
  tokens = rng.integers(1, v, (n, t)).astype(np.int32) * mask
  rewards = rng.integers(0, 2, n).astype(np.float32)
  groups = rewards.reshape(-1, GROUP)
  advantages = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
  group_ids = np.repeat(np.arange(n // GROUP), GROUP).astype(np.int32)
  return dict(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=tokens, mask=mask,
              old_logp=(-3.0 * rng.random((n, t))).astype(np.float32) * mask,
              ref_logp=(-3.0 * rng.random((n, t))).astype(np.float32) * mask,
              advantages=advantages.astype(np.float32), rewards=rewards, correct=rewards.astype(np.int32),
              group_ids=group_ids, domain_ids=(group_ids % DOMAINS).astype(np.int32))


def _progress(spec: dict, **entry) -> None:
  """Appends one JSON line to the worker's progress file: what survives if the watchdog kills it."""
  if spec.get("progress"):
    with open(spec["progress"], "a") as f:
      f.write(json.dumps(entry) + "\n")


def time_updates(step, repeats: int, label: str, tokens: int, warmup: bool = True,
                 spec: dict | None = None) -> tuple[float, list[float]]:
  """One warm-up call (unless warmup=False), then `repeats` timed calls; step(i) must block until done."""
  seconds = 0.0
  if warmup:
    t0 = time.perf_counter()
    step(-1)
    seconds = time.perf_counter() - t0
    log(f"  {label}: warm-up update {seconds:.1f}s")
    _progress(spec or {}, warmup=seconds, rss=max_rss_bytes())
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    step(i)
    times.append(time.perf_counter() - t0)
    log(f"  {label}: update {i + 1}/{repeats} {times[-1]:.2f}s ({tokens / times[-1]:.1f} tok/s)")
    _progress(spec or {}, update=times[-1], rss=max_rss_bytes())
  return seconds, times


# ----------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one `BENCH_JSON {...}` line on stdout.


def _planned_bytes(compiled, extra_live: int = 0) -> int:
  """What XLA plans to hold while `compiled` runs: its arguments, outputs (less donated aliases) and
  temporaries, plus `extra_live` bytes that stay alive outside it."""
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes + extra_live


def worker_ours(spec: dict) -> dict:
  use_shape(spec["shape"])
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mcpo_jax.batch import TrainBatch
  from mcpo_jax.mesh import make_mesh
  from mcpo_jax.model import ModelConfig, init_model
  from mcpo_jax.objectives import ObjectiveConfig
  from mcpo_jax.train import (OptimConfig, UpdateConfig, forward_rollouts, init_train_state, jit_update_step,
                              make_optimizer, shard_batch)

  prefix = "shared" if spec["shared_prefix"] else "unshared"
  t, label = spec["length"], f"ours {spec['algorithm']} {prefix} T={spec['length']}"
  mesh = make_mesh(1, -1, 1)  # one CPU device, as rl_loop builds it
  model = init_model(ModelConfig(model_type="llama", tie_word_embeddings=True, **dims(spec)), seed=0, mesh=mesh,
                     remat=spec["remat"])
  jax.block_until_ready(jax.tree.leaves(model))
  baseline = max_rss_bytes()
  optimizer = make_optimizer(OptimConfig(learning_rate=1e-6))
  objective = ObjectiveConfig(algorithm=spec["algorithm"], group_size=GROUP)
  config = UpdateConfig(objective=objective, micro_batches=spec["micro_batches"], logit_chunk=spec["logit_chunk"],
                        shared_prefix=spec["shared_prefix"])
  graphdef, state = init_train_state(model, optimizer, proj_dim=256)
  del model
  batch = shard_batch(TrainBatch(**make_batch(t)), mesh)
  transfer = jnp.ones((DOMAINS, DOMAINS), jnp.float32)
  t0 = time.perf_counter()
  update = jit_update_step(graphdef, optimizer, config, state).lower(state, batch, transfer).compile()
  planned, compile_s = _planned_bytes(update), time.perf_counter() - t0
  log(f"  {label}: compiled in {compile_s:.1f}s; XLA plans {planned / 1e9:.2f} GB "
      f"(+ {baseline / 1e9:.2f} GB RSS after model init)")
  if baseline + planned > spec["mem_cap"]:
    return dict(oom=f"XLA plans {planned / 1e9:.1f} GB for the update (+ {baseline / 1e9:.1f} GB after init), over "
                    f"the {spec['mem_cap'] / 1e9:.0f} GB cap; not run", planned=planned, baseline_rss=baseline)
  tokens = ROWS * (PROMPT_LEN + t)
  holder = {"state": state}

  def step(i):
    holder["state"], metrics = update(holder["state"], batch, transfer)
    jax.block_until_ready((holder["state"], metrics))
    holder["metrics"] = metrics

  warmup, times = time_updates(step, spec["repeats"], label, tokens, warmup=spec.get("warmup", True), spec=spec)
  metrics = {k: float(v) for k, v in holder["metrics"].items()}
  assert metrics["skipped"] == 0.0 and np.isfinite(metrics["loss"]), metrics
  result = dict(times=times, warmup=warmup + compile_s, warmed=spec.get("warmup", True), compile=compile_s,
                planned=planned, peak_rss=max_rss_bytes(),
                baseline_rss=baseline, loss=metrics["loss"], anchors=metrics.get("anchors"), jax=jax.__version__)

  if spec.get("breakdown"):  # forward-only and loss+grad (no optimizer) of the same update, same process
    from flax import nnx
    from mcpo_jax.train import loss_and_grads
    params = holder["state"].params

    def forward(lm_params):
      logp, _, pooled = forward_rollouts(nnx.merge(graphdef, lm_params), batch, config.temperature,
                                         config.logit_chunk, config.prompt_group)
      return jnp.sum(logp * batch.mask) + jnp.sum(pooled)

    fwd = jax.jit(forward)
    grad = jax.jit(lambda p: loss_and_grads(graphdef, p, batch, transfer, config)[2])
    for name, fn, arg in (("forward", fwd, params["lm"]), ("loss+grad", grad, params)):
      _, part = time_updates(lambda i: jax.block_until_ready(fn(arg)), spec["repeats"], f"{label} {name}", tokens)
      result[f"{name}_times"] = part
  if spec.get("profile_dir"):
    jax.profiler.start_trace(spec["profile_dir"])
    step(0)
    jax.profiler.stop_trace()
    log(f"  {label}: trace of one update in {spec['profile_dir']}")
  return result


def worker_tunix(spec: dict) -> dict:
  use_shape(spec["shape"])
  try:
    import tunix  # noqa: F401
    from tunix.models.llama3 import model as tunix_llama3
    from tunix.rl import algo_core
    from tunix.rl import common as tunix_common
    from tunix.rl.grpo.grpo_learner import GRPOConfig
  except Exception as error:  # ImportError, or a missing dependency of tunix
    return dict(skipped=f"tunix is not importable under {sys.executable} ({type(error).__name__}: {error}); "
                        f"{INSTALL_HINT}")
  import importlib.metadata

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  t, remat = spec["length"], spec.get("remat", "NONE")
  label = f"tunix grpo T={t} remat={remat}"
  d = dims(spec)
  model_config = tunix_llama3.ModelConfig(
      num_layers=d["num_layers"], vocab_size=d["vocab_size"], embed_dim=d["hidden_size"],
      hidden_dim=d["intermediate_size"], num_heads=d["num_heads"], head_dim=d["head_dim"],
      num_kv_heads=d["num_kv_heads"], rope_theta=int(d["rope_theta"]), norm_eps=d["rms_norm_eps"],
      weight_tying=True, remat_config=getattr(tunix_llama3.RematConfig, remat))
  model = tunix_llama3.Llama3(model_config, rngs=nnx.Rngs(0))  # random weights, float32
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  baseline = max_rss_bytes()
  # The same optimizer as ours: global-norm clip 1.0, then AdamW.
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                               optax.adamw(1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)),
                            wrt=nnx.Param)
  # Our objective's settings: token-mean, ε = 0.2, dual clip 3, k3 (tunix: low_var_kl) with β = 0.001.
  algo = GRPOConfig(num_generations=GROUP, beta=0.001, kl_loss_mode="low_var_kl", epsilon=0.2,
                    loss_agg_mode="token-mean")
  algo.temperature = 1.0  # GRPOLearner copies it from the rollout config
  algo.epsilon_c = 3.0  # grpo_loss_fn reads it with getattr (dual-clip PPO)

  raw = make_batch(t)
  example = tunix_common.TrainExample(
      prompt_ids=jnp.asarray(raw["prompt_tokens"]), prompt_mask=jnp.asarray(raw["prompt_mask"]),
      completion_ids=jnp.asarray(raw["tokens"]), completion_mask=jnp.asarray(raw["mask"]),
      advantages=jnp.asarray(raw["advantages"]), ref_per_token_logps=jnp.asarray(raw["ref_logp"]),
      old_per_token_logps=jnp.asarray(raw["old_logp"]))

  def loss_fn(model, train_example):  # as GRPOLearner wraps it (pad 0 marks padding)
    return algo_core.grpo_loss_fn(model, train_example, algo_config=algo, pad_id=0, eos_id=-1)

  def train_step(model, optimizer, train_example):  # PeftTrainer._train_step
    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, train_example)
    grad_norm = optax.global_norm(grads)
    optimizer.update(model, grads)
    return loss, aux, grad_norm

  jitted = nnx.jit(train_step, donate_argnames=("optimizer",))
  t0 = time.perf_counter()
  planned = _planned_bytes(jitted.lower(model, optimizer, example).compile())  # XLA's plan, before running
  compile_s = time.perf_counter() - t0
  log(f"  {label}: compiled in {compile_s:.1f}s; XLA plans {planned / 1e9:.2f} GB "
      f"(+ {baseline / 1e9:.2f} GB RSS after model init)")
  if baseline + planned > spec["mem_cap"]:
    return dict(oom=f"XLA plans {planned / 1e9:.1f} GB for the update (+ {baseline / 1e9:.1f} GB after init), over "
                    f"the {spec['mem_cap'] / 1e9:.0f} GB cap; not run", planned=planned, baseline_rss=baseline)
  tokens = ROWS * (PROMPT_LEN + t)
  holder = {}

  def step(i):
    holder["out"] = jax.block_until_ready(jitted(model, optimizer, example))

  warmup, times = time_updates(step, spec["repeats"], label, tokens, spec=spec)
  return dict(times=times, warmup=warmup + compile_s, compile=compile_s, planned=planned, peak_rss=max_rss_bytes(),
              baseline_rss=baseline, loss=float(holder["out"][0]), tunix=importlib.metadata.version("google-tunix"), jax=jax.__version__)


WORKERS = dict(matmul=worker_matmul, ours=worker_ours, tunix=worker_tunix)


# ----------------------------------------------------------------------------------------------
# Running workers under a memory watchdog.


def _rss_of(pid: int) -> int:
  try:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError):
    pass
  return 0


def _mem_available() -> int:
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  except (OSError, ValueError):
    pass
  return 1 << 62


def run_worker(name: str, spec: dict, python: str, mem_cap: float, mem_reserve: float) -> dict:
  """Runs one worker in a fresh interpreter under the RSS watchdog; returns its JSON result."""
  log(f"[{name} {json.dumps({k: v for k, v in spec.items() if k != 'profile_dir'})}]")
  progress = tempfile.NamedTemporaryFile(prefix=f"train_step_{name}_", suffix=".jsonl", delete=False)
  progress.close()
  spec = dict(spec, progress=progress.name)
  cmd = [python, str(Path(__file__).resolve()), f"--_worker={name}", f"--_spec={json.dumps(spec)}"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
  killed: dict = {}

  def watch():
    while proc.poll() is None:
      rss, available = _rss_of(proc.pid), _mem_available()
      if rss > mem_cap or available < mem_reserve:
        killed.update(rss=rss, available=available)
        proc.send_signal(signal.SIGKILL)
        return
      time.sleep(0.05)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  stdout, _ = proc.communicate()
  watcher.join()
  done = [json.loads(line) for line in Path(progress.name).read_text().splitlines() if line.strip()]
  os.unlink(progress.name)
  if killed:
    why = (f"RSS {killed['rss'] / 1e9:.1f} GB passed the {mem_cap / 1e9:.1f} GB cap; killed"
           if killed["rss"] > mem_cap else
           f"the machine's MemAvailable fell to {killed['available'] / 1e9:.1f} GB at RSS {killed['rss'] / 1e9:.1f} GB "
           "(other processes hold memory); killed")
    if done:
      why += "; before that: " + ", ".join(
          f"{'warm-up' if 'warmup' in d else 'update'} {d.get('warmup', d.get('update')):.1f}s" for d in done)
    log(f"  {name}: killed by the memory watchdog: {why}")
    return dict(oom=why, partial=done)
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
  return dict(error=f"{name} worker exited with status {proc.returncode} and no result; see its stderr above. "
                    f"stdout tail: {stdout[-500:]!r}")


# ----------------------------------------------------------------------------------------------
# Orchestration and report.


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--peers", default="tunix", help="'tunix' or '' (none)")
  parser.add_argument("--lengths", default="128,256,512", help="response lengths T for ours (comma-separated)")
  parser.add_argument("--algorithms", default="mcpo,grpo",
                      help="ours at T = --peer_length: the last --micro_batches value runs all of them, the others the first")
  parser.add_argument("--long_algorithms", default="mcpo", help="ours at T > --peer_length")
  parser.add_argument("--peer_length", type=int, default=128, help="T at which the peer runs and RESULT is taken")
  parser.add_argument("--repeats", type=int, default=3, help="timed updates after the warm-up (median reported)")
  parser.add_argument("--long_repeats", type=int, default=1, help="timed updates at T > --peer_length")
  parser.add_argument("--long_warmup", action="store_true",
                      help="warm up before the timed updates at T > --peer_length too (default: no warm-up there, "
                           "the update after compilation is timed, first-touch of its buffers included)")
  parser.add_argument("--micro_batches", default="4,1",
                      help="ours: gradient-accumulation micro-batches, one run per value; RESULT and T > --peer_length "
                           "use the first")
  parser.add_argument("--prefix", default="shared,unshared",
                      help="ours: 'shared' (the shipped train.shared_prefix: each group's prompt encoded once) "
                           "and/or 'unshared' (every row encodes prompt + response); the first is RESULT's")
  parser.add_argument("--shape", choices=sorted(SHAPES), default="bench",
                      help="prompts x rollouts x prompt bucket: bench = 4 x 8 x 64 (the peer comparison), "
                           "default-run = 3 x 6 x 128 (the README's first command)")
  parser.add_argument("--logit_chunk", type=int, default=64, help="ours: response positions per LM-head chunk")
  parser.add_argument("--remat", choices=("none", "full", "save_dots"), default="none",
                      help="ours: per-layer rematerialisation")
  parser.add_argument("--breakdown", action="store_true",
                      help="ours: also time forward-only and loss+grad (no optimizer) at each config")
  parser.add_argument("--profile_dir", default="", help="ours: write a jax.profiler trace of one update here")
  parser.add_argument("--tunix_remat", default="auto", choices=("auto", "NONE", "BLOCK", "DECODER"),
                      help="tunix's RematConfig; auto = its default NONE, then BLOCK if NONE does not fit")
  parser.add_argument("--tunix_python", default="",
                      help=f"interpreter with google-tunix (default {DEFAULT_TUNIX_PYTHON} if it exists, else this one)")
  parser.add_argument("--mem_cap_gb", type=float, default=22.0,
                      help="kill a worker whose RSS passes this (GB = 1e9 bytes); a step whose XLA memory plan "
                           "already passes it is compiled but not run")
  parser.add_argument("--mem_reserve_gb", type=float, default=0.75,
                      help="kill a worker when the machine's MemAvailable falls below this")
  parser.add_argument("--num_layers", type=int, default=0, help="smoke runs only: fewer layers than SmolLM2's 30")
  parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._worker:
    result = WORKERS[args._worker](json.loads(args._spec))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return

  use_shape(args.shape)
  split = lambda text: [x.strip() for x in text.split(",") if x.strip()]
  lengths, algorithms, peers = sorted(int(x) for x in split(args.lengths)), split(args.algorithms), split(args.peers)
  micro_batches = [int(x) for x in split(args.micro_batches)]
  prefixes = split(args.prefix)
  if not prefixes or any(p not in ("shared", "unshared") for p in prefixes):
    parser.error("--prefix: use shared and/or unshared.")
  # Variant "mb=4" is the shipped shared-prefix update; "mb=4 u" the same with every row encoding its prompt.
  variants = [f"mb={m}" + ("" if prefix == "shared" else " u") for m in micro_batches for prefix in prefixes]
  long_algorithms = [a for a in split(args.long_algorithms)]
  for a in algorithms + long_algorithms:
    if a not in ("mcpo", "grpo"):
      parser.error(f"unknown algorithm {a!r}; use mcpo and/or grpo.")
  for p in peers:
    if p != "tunix":
      parser.error(f"--peers: unknown peer {p!r}; the only peer is tunix.")
  if not micro_batches or any((ROWS // GROUP) % m for m in micro_batches):
    parser.error(f"--micro_batches: each value must divide the {ROWS // GROUP} prompts (micro-batches hold whole "
                 "groups).")
  tunix_python = args.tunix_python or (DEFAULT_TUNIX_PYTHON if Path(DEFAULT_TUNIX_PYTHON).exists() else sys.executable)
  mem_cap, mem_reserve = args.mem_cap_gb * 1e9, args.mem_reserve_gb * 1e9

  log(f"CPU: {cpu_model()}, {cpu_cores()} cores; load average {os.getloadavg()}; "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  started = time.perf_counter()
  run = lambda name, spec, python=sys.executable: run_worker(name, spec, python, mem_cap, mem_reserve)
  matmul = run("matmul", {})
  rows = []  # (engine, variant, algorithm, T, result)
  shipped = dict(logit_chunk=args.logit_chunk, remat=args.remat, breakdown=args.breakdown, shape=args.shape)
  settings = {}
  for i, variant in enumerate(variants):
    options = settings[variant] = dict(shipped, micro_batches=micro_batches[i // len(prefixes)],
                                       shared_prefix=not variant.endswith(" u"))
    for t in lengths:
      if t == args.peer_length:
        todo = algorithms if i == len(variants) - 1 else algorithms[:1]
      else:  # the memory-vs-T series: the first --micro_batches value only
        todo = long_algorithms if i == 0 else []
      for algorithm in todo:
        long = t > args.peer_length
        spec = dict(algorithm=algorithm, length=t, repeats=args.long_repeats if long else args.repeats,
                    warmup=args.long_warmup or not long, mem_cap=mem_cap, num_layers=args.num_layers, **options)
        if args.profile_dir:
          spec["profile_dir"] = f"{args.profile_dir}/{variant}_{algorithm}_T{t}"
        rows.append(("ours", variant, algorithm, t, run("ours", spec)))
  if "tunix" in peers:
    for remat in (("NONE", "BLOCK") if args.tunix_remat == "auto" else (args.tunix_remat,)):
      result = run("tunix", dict(length=args.peer_length, repeats=args.repeats, mem_cap=mem_cap,
                                 num_layers=args.num_layers, remat=remat, shape=args.shape), tunix_python)
      rows.append(("tunix", remat.lower(), "grpo", args.peer_length, result))
      if "oom" not in result:
        break
  elapsed = time.perf_counter() - started

  body, head, params = params_of(args.num_layers or SMOLLM2["num_layers"])
  peak = matmul.get("flops")
  gb = lambda b: f"{b / 1e9:.2f}"
  print()
  print(f"Update step: SmolLM2-135M dimensions ({params / 1e6:.1f}M matmul params = {body / 1e6:.1f}M non-embedding "
        f"+ {head / 1e6:.1f}M tied LM head), random weights, float32, {ROWS} rows = {ROWS // GROUP} prompts x {GROUP}, "
        f"{DOMAINS} domains, {PROMPT_LEN}-token prompts, T-token responses (ragged), global-norm clip + AdamW.")
  print(f"CPU: {cpu_model()}, {cpu_cores()} cores; load average at the end {os.getloadavg()}; total {elapsed:.0f}s.")
  for variant in variants:
    o = settings[variant]
    print(f"ours {variant}: micro_batches={o['micro_batches']} shared_prefix={o['shared_prefix']} "
          f"logit_chunk={o['logit_chunk']} remat={o['remat']}")
  if "tunix" in peers:
    print(f"tunix: grpo_loss_fn + nnx.Optimizer(clip + AdamW) under nnx.jit; variant = its RematConfig (NONE is "
          f"its default; BLOCK is tried when NONE does not fit); {tunix_python}")
  versions = {f"{e} {v} {a} T={t}": {k: x for k, x in r.items() if k in ("jax", "tunix")} for e, v, a, t, r in rows}
  versions = {k: v for k, v in versions.items() if v}
  print(f"Versions: {json.dumps(dict({'matmul': {'jax': matmul.get('jax')}}, **versions))}")
  if peak:
    print(f"float32 matmul peak (jnp.dot 2048x2048, median of 10 after warm-up): {peak / 1e9:.1f} GFLOP/s -> "
          f"bound {peak / (6 * params):.0f} tok/s at 6 x params FLOPs per token")
  header = (f"{'engine':<6} {'variant':<8} {'algo':<4} {'T':>4} {'N(P+T)':>6} {'runs':>4} {'compile+warm s':>14} "
            f"{'median s':>8} {'tok/s':>6} {'resp tok/s':>10} {'of bound':>8} {'XLA plan GB':>11} {'peak RSS GB':>11} "
            f"{'after init':>10} {'delta GB':>8}")
  print()
  print(header)
  print("-" * len(header))
  def computed_share(engine, variant, t):  # positions the update computes / N·(P + T)
    shared = engine == "ours" and not variant.endswith(" u")
    return ((ROWS // GROUP) * PROMPT_LEN + ROWS * t) / (ROWS * (PROMPT_LEN + t)) if shared else 1.0

  rates = {}
  for engine, variant, algorithm, t, r in rows:
    tokens = ROWS * (PROMPT_LEN + t)
    lead = f"{engine:<6} {variant:<8} {algorithm:<4} {t:>4} {tokens:>6}"
    if "times" not in r:
      why = r.get("oom") or r.get("skipped") or r.get("error")
      print(f"{lead}  {'does not fit: ' if 'oom' in r else 'n/a: '}{why}")
      continue
    median = statistics.median(r["times"])
    rate = tokens / median
    rates[(engine, variant, algorithm, t)] = rate
    frac = f"{rate * computed_share(engine, variant, t) * 6 * params / peak:8.1%}" if peak else f"{'n/a':>8}"
    runs = f"{len(r['times'])}{'' if r.get('warmed', True) else '*'}"
    print(f"{lead} {runs:>4} {r['warmup']:>14.1f} {median:>8.2f} {rate:>6.1f} {ROWS * t / median:>10.1f} "
          f"{frac} {gb(r['planned']):>11} {gb(r['peak_rss']):>11} {gb(r['baseline_rss']):>10} "
          f"{gb(r['peak_rss'] - r['baseline_rss']):>8}")
    for part in ("forward", "loss+grad"):
      if f"{part}_times" in r:
        m = statistics.median(r[f"{part}_times"])
        print(f"{'':<29} {part:>9} only: {m:.2f} s ({m / median:.0%} of the update)")
  print("(runs = timed updates after one warm-up update; * = no warm-up, the first update after compilation; "
        "compile+warm = ahead-of-time compilation + the warm-up update. "
        "tok/s = N(P+T) / median update time: prompt + response positions, padding included; resp tok/s counts "
        "N*T; of bound = computed positions/s x 6 x params / matmul peak (shared prefix: B*P + N*T positions); "
        "XLA plan = arguments + outputs - donated + temporaries "
        "of the compiled step; peak RSS = ru_maxrss of the worker process; after init = its ru_maxrss right after "
        "model init; delta = the difference; GB = 1e9 bytes.)")
  for variant in variants:
    by_t = sorted((t, r) for e, v, a, t, r in rows if e == "ours" and v == variant and a == long_algorithms[0]
                  and "peak_rss" in r) if long_algorithms else []
    if len(by_t) >= 2:
      (t0, r0), (t1, r1) = by_t[0], by_t[-1]
      slope = (r1["peak_rss"] - r0["peak_rss"]) / (t1 - t0)
      print(f"ours {variant} {long_algorithms[0]} peak RSS vs T: "
            + ", ".join(f"T={t}: {gb(r['peak_rss'])} GB" for t, r in by_t)
            + f"; {slope * 128 / 1e9:.2f} GB per 128 more response tokens")

  tunix_rates = [(v, rate) for (e, v, a, t), rate in rates.items() if e == "tunix"]
  if tunix_rates and tunix_rates[0][0] != "none":
    print(f"vs_tunix is against tunix with RematConfig.{tunix_rates[0][0].upper()}: its default (NONE) did not fit.")

  def ratios(variant):
    mine = rates.get(("ours", variant, "mcpo", args.peer_length))
    theirs = tunix_rates[0][1] if tunix_rates else None
    vs = f"{mine / theirs:.2f}" if mine and theirs else "n/a"
    computed = computed_share("ours", variant, args.peer_length)
    frac = f"{mine * computed * 6 * params / peak:.3f}" if mine and peak else "n/a"
    return vs, frac

  def vs_unshared(m):  # the shared-prefix update's speed-up: unshared update time / shared update time
    pairs = [(rates.get(("ours", f"mb={m}", a, args.peer_length)),
              rates.get(("ours", f"mb={m} u", a, args.peer_length))) for a in algorithms]
    return ", ".join(f"{a}={s / u:.2f}" for a, (s, u) in zip(algorithms, pairs) if s and u) or "n/a"

  for variant in variants[1:]:
    vs, frac = ratios(variant)
    print(f"ours {variant}: vs_tunix={vs} frac_of_matmul_peak={frac}")
  for m in micro_batches:
    print(f"ours mb={m}: shared-prefix speed-up (unshared time / shared time) at T={args.peer_length}: "
          f"{vs_unshared(m)}")
  vs, frac = ratios(variants[0])
  print(f"RESULT vs_tunix={vs} frac_of_matmul_peak={frac}")


if __name__ == "__main__":
  main()
