"""MCPO / GRPO on several domains at once.

`python run.py --config=configs/multi_domain.py[:preset] --config.<field>=<value>`. Presets:
  default               SmolLM2-135M-Instruct (embedded) on three offline reasoning-gym domains, CPU-sized
  tiny                  a few seconds per step: tests and smoke runs
  compare               the transfer task, sized for mcpo_jax.experiments.compare (150 held-out prompts, k = 4)
  transfer              the default on addition in three formats (digits, words, story): known transfer
  qwen2.5-7b-instruct   paper scale on a TPU pod: math + code + logic files on gs://
  qwen3-8b              the same recipe for Qwen3-8B
A paper preset takes a slice's layout after "@": `qwen3-8b@v6e-256` (SLICE_LAYOUTS, plus PRESET_SLICE_LAYOUTS;
tpu_setup/README.md).
Plain GRPO is `--config.algorithm=grpo`; single-domain GRPO also sets the domains, e.g.
`--config.data.domains='{"arithmetic": ...}'` or a preset's subset (see README).
"""

import ml_collections

from mcpo_jax.config import defaults
from mcpo_jax.data.transfer import transfer_domains

PRESETS = ("default", "tiny", "compare", "transfer", "qwen2.5-7b-instruct", "qwen3-8b")
PAPER_PRESETS = ("qwen2.5-7b-instruct", "qwen3-8b")
# What a paper preset changes for a slice, each checked with `python -m mcpo_jax.aot` (tpu_setup/README.md).
SLICE_LAYOUTS = {
    "v5e-64": {},  # the preset's own: fsdp 16 × tensor 4, two rollout calls of 1024 rows
    "v5p-64": {},  # fsdp 8 × tensor 4
    # 2048 rows over 256 chips leave a decode step bound by its weight reads: keep fsdp small beside a data axis
    # and split the decode's MLP over fsdp × tensor (rollout.mlp_over_fsdp); one rollout call and one evaluation
    # call (768 prompts), so the weights are read once per token; a micro-batch of 64 rows covers the 64 batch shards.
    "v6e-256": {"mesh.data": 16, "mesh.fsdp": 4, "train.micro_batches": 8, "rollout.max_rows_per_call": 0,
                "rollout.mlp_over_fsdp": True, "eval.prompts_per_call": 768},
}
# What one preset adds on a slice. Qwen3-8B's KV cache is 2.6× Qwen2.5-7B's per token, and on v6e-256 its decode is
# bound by reading it: int8 response slots halve those reads (RL step bound 16.9 → 14.1 s, MFU bound 0.28 → 0.39),
# with π_old recomputed by a teacher-forced pass, as the int8 sampler needs.
PRESET_SLICE_LAYOUTS = {
    ("qwen3-8b", "v6e-256"): {"rollout.kv_cache": "int8", "train.recompute_old_logp": True},
}


def _paper_scale_domains(bucket: str) -> dict:
  """Math (DeepScaleR / DAPO-Math-17k style), code (CodeR1-12k with tests), logic (Knights-and-Knaves)."""
  files = lambda name: {"train": f"{bucket}/data/{name}/train.jsonl", "validation": f"{bucket}/data/{name}/val.jsonl",
                        "test": f"{bucket}/data/{name}/test.jsonl"}
  return {
      "math": {"source": {"kind": "jsonl", "path": files("math"), "fields": {"prompt": "problem", "answer": "answer"}},
               "verifier": "math", "answer_format": "boxed"},
      "code": {"source": {"kind": "jsonl", "path": files("code"), "fields": {"prompt": "question", "tests": "tests"}},
               "verifier": "code", "answer_format": "code_block"},
      "logic": {"source": {"kind": "jsonl", "path": files("logic"),
                           "fields": {"prompt": "quiz", "answer": "solution_text"}},
                "verifier": "exact", "answer_format": "answer_tag"},
  }


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  preset, _, slice_name = (preset or "default").partition("@")
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}.")
  if slice_name and (preset not in PAPER_PRESETS or slice_name not in SLICE_LAYOUTS):
    raise ValueError(f"unknown slice layout {preset}@{slice_name}; a paper preset ({', '.join(PAPER_PRESETS)}) "
                     f"takes one of: {', '.join('@' + name for name in SLICE_LAYOUTS)}.")
  config = _preset(preset)
  layout = {**SLICE_LAYOUTS.get(slice_name, {}), **PRESET_SLICE_LAYOUTS.get((preset, slice_name), {})}
  for field, value in layout.items():
    section, name = field.split(".")
    config[section][name] = value
  config.preset = f"{preset}@{slice_name}" if slice_name else preset
  return config


def _preset(preset: str) -> ml_collections.ConfigDict:
  config = defaults()  # every field and its default: mcpo_jax/config.py
  if preset == "tiny":
    config.workdir = "runs/tiny"
    config.data.prompts_per_step = 3
    config.rollout.group_size = 4
    config.rollout.max_new_tokens = 8
    config.eval.prompts_per_domain = 2
    config.eval.k = 2
    config.eval.max_new_tokens = 8
    config.train.steps = 3
    config.checkpoint.every = 1
    config.objective.proj_dim = 16
    config.diag_every = 2
    config.export_hf = False
  elif preset == "compare":  # one arm × seed of mcpo_jax.experiments.compare; its evaluation dominates the time
    config.workdir = "runs/compare"
    config.data.domains = transfer_domains()  # the task with known transfer (the `transfer` preset's)
    config.train.steps = 4
    config.optim.learning_rate = 1e-5  # 4 steps at the default 2e-6 would not move the policy
    config.eval.every = 0  # the start and the end: 2 × 150 prompts × (1 greedy + 4 samples) per domain
    config.eval.k = 4  # mean@4 beside greedy pass@1
    config.eval.prompts_per_domain = 150  # a paired per-domain difference of ~0.15 is then detectable (README)
    config.checkpoint.every = 2
    config.diag_every = 4  # gradient cosines at the first and the last step
    config.export_hf = False
  elif preset == "transfer":  # one skill, three surface formats, each a domain; held-out operand pairs
    config.workdir = "runs/transfer"
    config.data.domains = transfer_domains()
    config.eval.prompts_per_domain = 150  # no constant answer is right on more than 3% of them
    config.eval.k = 4
  elif preset in PAPER_PRESETS:
    bucket = "gs://YOUR_BUCKET"
    config.workdir = f"{bucket}/runs/{preset}-mcpo"
    config.model.name = f"{bucket}/models/" + {"qwen2.5-7b-instruct": "Qwen2.5-7B-Instruct", "qwen3-8b": "Qwen3-8B"}[preset]
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
    # One layout for v5e-64, v5p-64 and v6e-256 (tpu_setup/README.md, "Does the paper preset fit?"): heads split over 4 chips
    # (28 and 32 query heads, 4 and 8 KV heads), FSDP over the rest; the sampler decodes from local bf16
    # weights in two calls of 1024 rows, so one call's KV cache fits a 16 GB v5e chip.
    config.mesh.tensor = 4
    config.rollout.gather_weights = True
    config.rollout.max_rows_per_call = 1024
    config.rollout.decode_segments = 4  # attend over the cache filled so far: 0.70 of the cache reads
    config.data.domains = _paper_scale_domains(bucket)
    config.data.prompts_per_step = 128
    config.data.max_prompt_tokens = 1024
    config.rollout.group_size = 16
    config.rollout.max_new_tokens = 4096
    config.rewards.processes = 32
    config.optim.learning_rate = 1e-6
    config.optim.warmup_steps = 10
    config.train.steps = 500
    config.train.minibatches = 4
    config.train.micro_batches = 16  # 32 rows per micro-batch: 2 per v5e-64 chip (8 do not fit); v6e-256: 8
    config.train.logit_chunk = 256
    config.eval.every = 25
    config.eval.prompts_per_domain = 256
    config.eval.max_new_tokens = 4096
    config.checkpoint.every = 25
    config.diag_every = 25
  return config
