"""MCPO / GRPO on several domains at once.

`python run.py --config=configs/multi_domain.py[:preset] --config.<field>=<value>`. Presets:
  default               SmolLM2-135M-Instruct (embedded) on three offline reasoning-gym domains, CPU-sized
  tiny                  a few seconds per step: tests and smoke runs
  compare               the transfer task, sized for mcpo_jax.experiments.compare (150 held-out prompts, k = 4)
  transfer              the default on addition in three formats (digits, words, story): known transfer
  qwen2.5-7b-instruct   paper scale on a TPU pod: math + code + logic files on gs://
  qwen3-8b              the same recipe for Qwen3-8B
Plain GRPO is `--config.algorithm=grpo`; single-domain GRPO also sets the domains, e.g.
`--config.data.domains='{"arithmetic": ...}'` or a preset's subset (see README).
"""

import ml_collections

from mcpo_jax.data.domains import default_domains
from mcpo_jax.data.transfer import transfer_domains

PRESETS = ("default", "tiny", "compare", "transfer", "qwen2.5-7b-instruct", "qwen3-8b")


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
  preset = preset or "default"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}.")
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.mode = "train"  # "train": the RL run; "chat": load the model and answer chat.prompt
  config.algorithm = "mcpo"  # "mcpo" | "grpo"
  config.seed = 0
  config.workdir = "runs/default"
  config.resume = "auto"  # "auto": continue from the newest complete checkpoint in workdir; "none"
  config.overwrite = False  # with resume="none": move a previous run in workdir aside (to <workdir>.overwritten-*)
  config.export_hf = True  # write the final policy as an HF directory to workdir/hf_export
  config.diag_every = 5  # D×D per-domain gradient cosines at the first and last step and every N (0 = never)

  config.model = ml_collections.ConfigDict()
  config.model.name = "smollm2-135m-instruct"  # HF dir (local or gs://), a .gguf file, or a zoo name
  config.model.tokenizer = ""  # empty: the tokenizer stored with the model
  config.model.dtype = "float32"  # compute dtype ("bfloat16" on TPU)
  config.model.param_dtype = ""  # empty: same as dtype
  config.model.remat = "none"  # none | full | save_dots

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.fsdp = -1  # -1: the rest of the devices
  config.mesh.tensor = 1

  config.data = ml_collections.ConfigDict()
  config.data.domains = default_domains()
  config.data.prompts_per_step = 3  # B prompts per RL step, stratified over domains by weight
  config.data.max_prompt_tokens = 192

  config.rollout = ml_collections.ConfigDict()
  config.rollout.group_size = 6  # G rollouts per prompt
  config.rollout.max_new_tokens = 48
  config.rollout.temperature = 1.0
  config.rollout.top_p = 1.0
  config.rollout.top_k = 0

  config.rewards = ml_collections.ConfigDict()
  config.rewards.processes = 2
  config.rewards.timeout_s = 120.0
  config.rewards.format_weight = 0.0
  config.rewards.sandbox = "bwrap"  # code runs in kernel namespaces; "unsafe": rlimits + audit hook only

  config.objective = ml_collections.ConfigDict()  # docs/DESIGN.md §4
  config.objective.eps_low = 0.2
  config.objective.eps_high = 0.2
  config.objective.dual_clip = 3.0
  config.objective.agg = "token-mean"
  config.objective.kl_kind = "k3"
  config.objective.kl_coef = 0.001
  config.objective.tau = 0.05
  config.objective.cross_topk = 4
  config.objective.in_domain_scope = "domain"
  config.objective.negative_scope = "prompt"
  config.objective.require_negative = True
  config.objective.lambda_cross = 0.1
  config.objective.lambda_in = 0.1
  config.objective.denominator = "shared"  # "shared" (X' ∪ I ∪ N for both terms) | "per_term"
  config.objective.head_warmup_steps = 0  # RL steps that train the contrastive head alone first
  config.objective.coupling = "loss"
  config.objective.repr_grad = "policy"
  config.objective.reward_bonus_min = -0.5
  config.objective.normalize_std = True
  config.objective.proj_dim = 256
  # Anchor domain -> domains whose correct rollouts may be its positives; unlisted anchors: all.
  config.objective.transfer = ml_collections.ConfigDict()

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-6
  config.optim.head_learning_rate = 1e-3
  config.optim.weight_decay = 0.01
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.max_grad_norm = 1.0
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"

  config.train = ml_collections.ConfigDict()
  config.train.steps = 10
  config.train.epochs = 1  # μ passes over each step's rollouts
  config.train.minibatches = 1  # optimizer steps per epoch (blocks of whole prompt groups)
  config.train.micro_batches = 1  # gradient accumulation within a minibatch
  config.train.logit_chunk = 64
  config.train.shared_prefix = True  # encode each group's prompt once in the update and the reference pass
  config.train.max_nonfinite_steps = 3

  config.eval = ml_collections.ConfigDict()
  config.eval.at_start = True
  config.eval.at_end = True
  config.eval.every = 0  # also every N steps (0 = only start and end)
  config.eval.split = "test"
  config.eval.prompts_per_domain = 8
  config.eval.k = 2  # mean@k with k samples at the rollout temperature (0 = pass@1 only)
  config.eval.max_new_tokens = 48

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 5
  config.checkpoint.keep_last = 2
  config.checkpoint.keep_best = 1
  config.checkpoint.best_metric = "eval/mean/pass@1"  # "" = keep no best; else an eval/<domain|mean>/<metric>
  config.checkpoint.preemption_grace_s = 25.0  # after SIGTERM, the save starts at the next phase boundary

  config.chat = ml_collections.ConfigDict()
  config.chat.prompt = "What is the capital of France? Answer in one sentence."
  config.chat.max_new_tokens = 64
  config.chat.temperature = 0.0  # 0 = greedy
  config.chat.top_p = 1.0
  config.chat.top_k = 0

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
  elif preset in ("qwen2.5-7b-instruct", "qwen3-8b"):
    bucket = "gs://YOUR_BUCKET"
    config.workdir = f"{bucket}/runs/{preset}-mcpo"
    config.model.name = f"{bucket}/models/" + {"qwen2.5-7b-instruct": "Qwen2.5-7B-Instruct", "qwen3-8b": "Qwen3-8B"}[preset]
    config.model.dtype = "bfloat16"
    config.model.remat = "full"
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
    config.train.micro_batches = 8
    config.train.logit_chunk = 256
    config.eval.every = 25
    config.eval.prompts_per_domain = 256
    config.eval.max_new_tokens = 4096
    config.checkpoint.every = 25
    config.diag_every = 25
  return config
