#!/usr/bin/env python
"""Rollout sampler throughput on CPU: mcpo_jax.sampling.generate vs transformers vs google-tunix.

All three generate exactly 128 new tokens per row after 64-token prompts, with SmolLM2-135M
dimensions, in float32, on the same CPU, one after the other. Each engine runs in its own
subprocess so that thread pools (XLA, PyTorch/OpenMP) and global flags (tunix flips a flax config
at import) never meet. The throughput counted is generated tokens / wall time of one whole call
(prefill + decode + host work).

  python benchmarks/sampler.py                       # everything (~30 min on 2 cores)
  python benchmarks/sampler.py --rows=32 --modes=greedy --peers=transformers

The last line is `RESULT vs_tunix=<x> vs_transformers=<y> frac_of_matmul_peak=<z>`:
x, y = our tok/s over the peer's at 32 rows (greedy); z = our fraction of the matmul bound at
128 rows (greedy). See benchmarks/README.md for the environment (tunix lives in its own venv).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

PROMPT_LEN = 64
NEW_TOKENS = 128
GROUP = 8  # rollouts per prompt: 8 rows = 1 prompt x 8, 32 = 4 x 8, 128 = 16 x 8
MATMUL_N = 2048
RESULT_TAG = "BENCH_JSON "
INSTALL_HINT = ("pip install --no-deps -r benchmarks/requirements.txt (in the benchmark venv; "
                "see benchmarks/README.md)")

# SmolLM2-135M(-Instruct) dimensions.
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
               num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5)


def matmul_params() -> tuple[int, int, int]:
  """(non-embedding matmul params, LM-head params, their sum): the weights each token multiplies by.

  The tied embedding is counted once, as the LM-head matmul (the input lookup is a gather, no FLOPs).
  Norm scales and attention-score FLOPs (which grow with context) are left out.
  """
  d = SMOLLM2
  attn = d["hidden_size"] * d["head_dim"] * (2 * d["num_heads"] + 2 * d["num_kv_heads"])
  mlp = 3 * d["hidden_size"] * d["intermediate_size"]
  body = d["num_layers"] * (attn + mlp)
  head = d["hidden_size"] * d["vocab_size"]
  return body, head, body + head


def cpu_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def prompts(rows: int):
  """The same prompt token ids for every engine: [B, P] with B = rows / G, ids in [1, vocab)."""
  import numpy as np
  group = min(GROUP, rows)
  if rows % group:
    raise SystemExit(f"--rows={rows}: each row count must be a multiple of {GROUP} (or below it).")
  rng = np.random.default_rng(1234 + rows)
  ids = rng.integers(1, SMOLLM2["vocab_size"], size=(rows // group, PROMPT_LEN), dtype=np.int32)
  return ids, group


def log(*parts) -> None:
  print(*parts, file=sys.stderr, flush=True)


def time_runs(fn, repeats: int, label: str) -> list[float]:
  """One warm-up call (compiles, fills caches), then `repeats` timed calls; returns their seconds."""
  t0 = time.perf_counter()
  fn(-1)
  log(f"  {label}: warm-up {time.perf_counter() - t0:.1f}s")
  times = []
  for run in range(repeats):
    t0 = time.perf_counter()
    fn(run)
    times.append(time.perf_counter() - t0)
    log(f"  {label}: run {run + 1}/{repeats} {times[-1]:.2f}s ({_rows_of(label) * NEW_TOKENS / times[-1]:.1f} tok/s)")
  return times


def _rows_of(label: str) -> int:
  return int(label.split("rows=")[1].split()[0])


# ----------------------------------------------------------------------------------------------
# Workers: each runs in its own process and prints one `BENCH_JSON {...}` line on stdout.


def worker_matmul(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.float32)
  dot = jax.jit(jnp.dot)
  for _ in range(3):
    dot(a, b).block_until_ready()
  times = []
  for _ in range(spec.get("matmul_repeats", 10)):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  seconds = statistics.median(times)
  return dict(flops=2 * MATMUL_N ** 3 / seconds, seconds=seconds, jax=jax.__version__)


def worker_ours(spec: dict) -> dict:
  import jax
  import numpy as np
  from mcpo_jax import sampling
  from mcpo_jax.model import ModelConfig, from_pretrained, init_model, save_pretrained

  t0 = time.perf_counter()
  if spec["weights"] == "smollm2":
    model = from_pretrained("smollm2-135m-instruct", dtype="float32")
  else:
    model = init_model(ModelConfig(model_type="llama", tie_word_embeddings=True, **SMOLLM2), seed=0)
  log(f"  ours: model ready in {time.perf_counter() - t0:.1f}s ({spec['weights']} weights)")
  if spec.get("export_dir"):
    save_pretrained(model, spec["export_dir"])
    log(f"  ours: exported the same weights to {spec['export_dir']} for transformers")

  results = []
  key = jax.random.key(0)
  for mode in spec["modes"]:
    for rows in spec["rows"]:
      prompt_tokens, group = prompts(rows)
      prompt_mask = np.ones_like(prompt_tokens)

      def call(run):
        out = sampling.generate(model, prompt_tokens, prompt_mask, group_size=group, max_new_tokens=NEW_TOKENS,
                                temperature=0.0 if mode == "greedy" else 1.0, key=key, step=run + 1)
        lengths = np.asarray(jax.block_until_ready(out.lengths))
        assert out.tokens.shape == (rows, NEW_TOKENS) and (lengths == NEW_TOKENS).all(), lengths

      times = time_runs(call, spec["repeats"], f"ours {mode} rows={rows}")
      results.append(dict(mode=mode, rows=rows, layout=f"{rows // group}x{group}", times=times))
  return dict(results=results, jax=jax.__version__, compiles=sampling.compile_count())


def worker_transformers(spec: dict) -> dict:
  import numpy as np
  import torch
  import transformers
  from transformers import LlamaForCausalLM

  threads = cpu_cores()
  torch.set_num_threads(threads)
  model = LlamaForCausalLM.from_pretrained(spec["export_dir"], dtype=torch.float32).eval()
  results = []
  for mode in spec["modes"]:
    for rows in spec["rows"]:
      prompt_tokens, group = prompts(rows)
      input_ids = torch.from_numpy(np.repeat(prompt_tokens, group, axis=0)).long()  # [N, P], a prompt's rows adjacent
      attention_mask = torch.ones_like(input_ids)
      if mode == "greedy":
        sampling_kwargs = dict(do_sample=False)
      else:
        sampling_kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)

      def call(run):
        torch.manual_seed(run + 1)
        with torch.inference_mode():
          out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, pad_token_id=0, **sampling_kwargs)
        assert tuple(out.shape) == (rows, PROMPT_LEN + NEW_TOKENS), out.shape

      repeats = spec["repeats"] if rows < spec["large_rows"] else spec["large_repeats"]
      times = time_runs(call, repeats, f"transformers {mode} rows={rows}")
      results.append(dict(mode=mode, rows=rows, layout=f"{rows} rows", times=times))
  return dict(results=results, torch=torch.__version__, transformers=transformers.__version__, threads=threads)


class _IdTokenizer:
  """tunix's Sampler takes strings: this tokenizer maps "17 4 9" <-> [17, 4, 9], so every engine sees
  the same prompt ids. bos 0 is falsy, so tunix prepends none; pad 0 never occurs in a prompt."""

  def encode(self, text, **kwargs):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kwargs):
    return " ".join(str(i) for i in ids)

  def bos_id(self):
    return 0

  def eos_id(self):
    return -1

  def pad_id(self):
    return 0


def worker_tunix(spec: dict) -> dict:
  try:
    import tunix  # noqa: F401  (the package __init__ pulls in most of its dependencies)
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.llama3 import model as tunix_llama3
  except Exception as error:  # ImportError, or a missing dependency of tunix
    return dict(skipped=f"tunix is not importable ({type(error).__name__}: {error}); {INSTALL_HINT}")
  import importlib.metadata

  import jax
  import numpy as np
  from flax import nnx

  d = SMOLLM2
  config = tunix_llama3.ModelConfig(
      num_layers=d["num_layers"], vocab_size=d["vocab_size"], embed_dim=d["hidden_size"],
      hidden_dim=d["intermediate_size"], num_heads=d["num_heads"], head_dim=d["head_dim"],
      num_kv_heads=d["num_kv_heads"], rope_theta=int(d["rope_theta"]), norm_eps=d["rms_norm_eps"],
      weight_tying=True)
  model = tunix_llama3.Llama3(config, rngs=nnx.Rngs(0))  # random weights, float32
  cache = tunix_sampler.CacheConfig(cache_size=PROMPT_LEN + NEW_TOKENS, num_layers=d["num_layers"],
                                    num_kv_heads=d["num_kv_heads"], head_dim=d["head_dim"])
  sampler = tunix_sampler.Sampler(model, _IdTokenizer(), cache)
  results = []
  for mode in spec["modes"]:
    for rows in spec["rows"]:
      prompt_tokens, group = prompts(rows)
      strings = [" ".join(map(str, row)) for row in np.repeat(prompt_tokens, group, axis=0)]  # N strings
      sampling_kwargs = dict(temperature=0.0) if mode == "greedy" else dict(temperature=1.0, top_p=1.0, top_k=None)

      def call(run):
        out = sampler(strings, max_generation_steps=NEW_TOKENS, max_prompt_length=PROMPT_LEN, echo=False,
                      eos_tokens=[-1], seed=run + 1, **sampling_kwargs)  # eos -1: never stops early
        assert len(out.tokens) == rows and all(len(t) == NEW_TOKENS for t in out.tokens), \
            [len(t) for t in out.tokens]

      repeats = spec["repeats"] if rows < spec["large_rows"] else spec["large_repeats"]
      times = time_runs(call, repeats, f"tunix {mode} rows={rows}")
      results.append(dict(mode=mode, rows=rows, layout=f"{rows} rows", times=times))
  return dict(results=results, tunix=importlib.metadata.version("google-tunix"), jax=jax.__version__)


WORKERS = dict(matmul=worker_matmul, ours=worker_ours, transformers=worker_transformers, tunix=worker_tunix)


def run_worker(name: str, spec: dict) -> dict:
  """Runs one worker in a fresh interpreter; its progress goes to stderr, its result comes back as JSON."""
  log(f"[{name}]")
  cmd = [sys.executable, str(Path(__file__).resolve()), f"--_worker={name}", f"--_spec={json.dumps(spec)}"]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(REPO))
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
  return dict(error=f"{name} worker exited with status {proc.returncode} and no result; see its stderr above. "
                    f"stdout tail: {proc.stdout[-500:]!r}")


# ----------------------------------------------------------------------------------------------
# Orchestration and report.


def tok_per_s(entry: dict) -> float:
  return entry["rows"] * NEW_TOKENS / statistics.median(entry["times"])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", default="8,32,128", help="comma-separated row counts N = B*G (G = 8)")
  parser.add_argument("--modes", default="greedy,sample", help="greedy (T=0) and/or sample (T=1)")
  parser.add_argument("--peers", default="tunix,transformers", help="peers to run next to ours; '' for none")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (median is reported)")
  parser.add_argument("--large_rows", type=int, default=128, help="peers at this many rows or more use --large_repeats")
  parser.add_argument("--large_repeats", type=int, default=1, help="timed runs of the slow peers at --large_rows")
  parser.add_argument("--weights", choices=("random", "smollm2"), default="random",
                      help="ours/transformers weights: random init, or the real smollm2-135m-instruct (tunix is random)")
  parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args._worker:
    result = WORKERS[args._worker](json.loads(args._spec))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return

  rows = [int(r) for r in args.rows.split(",") if r.strip()]
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  peers = [p.strip() for p in args.peers.split(",") if p.strip()]
  for mode in modes:
    if mode not in ("greedy", "sample"):
      parser.error(f"--modes: unknown mode {mode!r}; use greedy and/or sample.")
  for peer in peers:
    if peer not in ("tunix", "transformers"):
      parser.error(f"--peers: unknown peer {peer!r}; use tunix and/or transformers.")
  for r in rows:
    prompts(r)  # validates
  spec = dict(rows=rows, modes=modes, repeats=args.repeats, large_rows=args.large_rows,
              large_repeats=args.large_repeats, weights=args.weights)

  log(f"CPU: {cpu_model()}, {cpu_cores()} cores; load average {os.getloadavg()}; "
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  started = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="mcpo_bench_weights_") as export_dir:
    outcomes = {"matmul": run_worker("matmul", spec)}
    outcomes["ours"] = run_worker("ours", spec | dict(export_dir=export_dir if "transformers" in peers else None))
    for peer in ("transformers", "tunix"):
      if peer in peers:
        outcomes[peer] = run_worker(peer, spec | dict(export_dir=export_dir))
  elapsed = time.perf_counter() - started

  body, head, params = matmul_params()
  peak = outcomes["matmul"].get("flops")
  print()
  print(f"Sampler throughput: SmolLM2-135M dimensions, float32, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new "
        f"tokens per row (no stop tokens), {args.weights} weights (tunix: random).")
  print(f"CPU: {cpu_model()}, {cpu_cores()} cores; load average at the end {os.getloadavg()}; total {elapsed:.0f}s.")
  versions = {name: {k: v for k, v in out.items() if k in ("jax", "torch", "transformers", "tunix", "threads")}
              for name, out in outcomes.items()}
  print(f"Versions: {json.dumps(versions)}")
  if peak:
    print(f"float32 matmul peak (jnp.dot {MATMUL_N}x{MATMUL_N}, median of 10 after warm-up): {peak / 1e9:.1f} GFLOP/s")
  print(f"FLOPs per generated token = 2 x {params / 1e6:.1f}M params ({body / 1e6:.1f}M non-embedding matmul + "
        f"{head / 1e6:.1f}M tied LM head counted once as a matmul; attention scores and prefill not counted)"
        + (f" -> bound {peak / (2 * params):.0f} tok/s" if peak else ""))
  for name, out in outcomes.items():
    if "skipped" in out:
      print(f"SKIPPED {name}: {out['skipped']}")
    elif "error" in out:
      print(f"FAILED {name}: {out['error']}")

  ours = {(e["mode"], e["rows"]): e for e in outcomes["ours"].get("results", [])}
  header = f"{'engine':<13} {'mode':<7} {'rows':>5} {'layout':<9} {'runs':>4} {'median s':>9} {'tok/s':>8} " \
           f"{'ours/this':>9} {'of bound':>8}"
  print()
  print(header)
  print("-" * len(header))
  for mode in modes:
    for r in rows:
      for name in ("ours", "transformers", "tunix"):
        entry = next((e for e in outcomes.get(name, {}).get("results", []) if e["mode"] == mode and e["rows"] == r),
                     None)
        if entry is None:
          continue
        rate = tok_per_s(entry)
        ratio = tok_per_s(ours[(mode, r)]) / rate if (mode, r) in ours else float("nan")
        frac = f"{rate * 2 * params / peak:8.1%}" if peak else f"{'n/a':>8}"
        print(f"{name:<13} {mode:<7} {r:>5} {entry['layout']:<9} {len(entry['times']):>4} "
              f"{statistics.median(entry['times']):>9.2f} {rate:>8.1f} {ratio:>9.2f} {frac}")
  print("(runs = timed runs after one warm-up; the median is shown. ours/this = our tok/s over this engine's, "
        "same mode and rows; of bound = tok/s x 2 x params / matmul peak.)")

  def ratio_vs(peer: str) -> str:
    mine = ours.get(("greedy", 32))
    theirs = next((e for e in outcomes.get(peer, {}).get("results", []) if e["mode"] == "greedy" and e["rows"] == 32),
                  None)
    return f"{tok_per_s(mine) / tok_per_s(theirs):.2f}" if mine and theirs else "n/a"

  big = ours.get(("greedy", 128))
  frac = f"{tok_per_s(big) * 2 * params / peak:.3f}" if big and peak else "n/a"
  print(f"RESULT vs_tunix={ratio_vs('tunix')} vs_transformers={ratio_vs('transformers')} frac_of_matmul_peak={frac}")


if __name__ == "__main__":
  main()
