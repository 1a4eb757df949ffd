#!/usr/bin/env python
"""XLA's memory plan of one update step, compiled but not run: how it grows with the response length.

  python benchmarks/update_memory_plan.py          # ~6 min on 2 cores; needs no memory beyond the model
  python benchmarks/update_memory_plan.py 4 128,256,512 shared,unshared   # also without the shared prefix

SmolLM2-135M dimensions, the batch of benchmarks/train_step.py (32 rows, 64-token prompts), MCPO,
T = 128 / 256 / 512 at micro_batches 4 and 1. The plan (arguments + outputs - donated + temporaries)
is what the compiled program holds at its peak, so sizes that do not fit this machine are still shown.
"""
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from train_step import DOMAINS, GROUP, _planned_bytes, dims, make_batch  # noqa: E402
from mcpo_jax.batch import TrainBatch  # noqa: E402
from mcpo_jax.mesh import make_mesh  # noqa: E402
from mcpo_jax.model import ModelConfig, init_model  # noqa: E402
from mcpo_jax.objectives import ObjectiveConfig  # noqa: E402
from mcpo_jax.train import (OptimConfig, UpdateConfig, init_train_state, jit_update_step,  # noqa: E402
                            make_optimizer, shard_batch)

mesh = make_mesh(1, -1, 1, devices=jax.devices()[:1])
model = init_model(ModelConfig(model_type="llama", tie_word_embeddings=True, **dims({})), seed=0, mesh=mesh)
optimizer = make_optimizer(OptimConfig(learning_rate=1e-6))
graphdef, state = init_train_state(model, optimizer, proj_dim=256)
transfer = jnp.ones((DOMAINS, DOMAINS), jnp.float32)
arg = lambda i, default: (sys.argv[i] if len(sys.argv) > i else default).split(",")
runs = [(prefix, int(mb), int(t)) for prefix in arg(3, "shared") for mb in arg(1, "4,1") for t in arg(2, "128,256,512")]
for prefix, mb, t in runs:
  config = UpdateConfig(objective=ObjectiveConfig(algorithm="mcpo", group_size=GROUP), micro_batches=mb,
                        logit_chunk=64, shared_prefix=prefix == "shared")
  batch = shard_batch(TrainBatch(**make_batch(t)), mesh)
  t0 = time.perf_counter()
  compiled = jit_update_step(graphdef, optimizer, config, state).lower(state, batch, transfer).compile()
  m = compiled.memory_analysis()
  print(f"{prefix} prefix, micro_batches={mb} T={t}: XLA plan {_planned_bytes(compiled) / 1e9:.2f} GB (temporaries "
        f"{m.temp_size_in_bytes / 1e9:.2f} GB, arguments {m.argument_size_in_bytes / 1e9:.2f} GB), "
        f"compiled in {time.perf_counter() - t0:.0f}s", flush=True)
