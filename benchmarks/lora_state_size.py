"""Optimizer state and orbax checkpoint size of a LoRA run of SmolLM2-135M vs a full run (one command:
`python benchmarks/lora_state_size.py [rank]`). The train state is what a run checkpoints: trained params,
AdamW state, contrastive head; a LoRA run's frozen base weights are in neither."""

import os
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from mcpo_jax.model import LoraSettings, apply_lora, from_pretrained  # noqa: E402
from mcpo_jax.train import OptimConfig, init_train_state, make_optimizer  # noqa: E402


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def checkpoint_bytes(state) -> int:
  with tempfile.TemporaryDirectory() as directory:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(directory, "state"), state)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(directory) for name in names)


rank = int(sys.argv[1]) if len(sys.argv) > 1 else 16
optimizer = make_optimizer(OptimConfig())
full_model = from_pretrained("smollm2-135m-instruct")
rows = {"full": init_train_state(full_model, optimizer)[1],
        f"LoRA r={rank}": init_train_state(apply_lora(full_model, LoraSettings(rank=rank))[0], optimizer)[1]}
sizes = {name: (nbytes(state.params), nbytes(state.opt_state), checkpoint_bytes(state)) for name, state in rows.items()}
full = sizes["full"]
print("| run | trained params | optimizer state | checkpoint |")
print("|---|---|---|---|")
for name, (params, opt, ckpt) in sizes.items():
  print(f"| {name} | {params / 1e6:.1f} MB | {opt / 1e6:.1f} MB ({opt / full[1]:.1%}) | {ckpt / 1e6:.1f} MB "
        f"({ckpt / full[2]:.1%}) |")
