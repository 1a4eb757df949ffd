"""The run config: frozen, typed sections, each field's default defined once, validated once at start-up.

`defaults()` is the ml_collections ConfigDict that config files start from and absl flags override
(`--config.train.steps=200`); its values come from the dataclasses below (and ObjectiveConfig,
OptimConfig), so a default exists in one place. `build(config)` turns the overridden ConfigDict into a
RunConfig and checks every value (choices, ranges, the fields that must agree, the checkpoint path)
before anything heavy starts: a mistake is one ConfigError naming `--config.<field>` and the fix.
The rest of the program reads only a RunConfig.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import difflib
import os
from typing import Any, Callable

import ml_collections

from mcpo_jax.data.domains import Domain, default_domains, parse_domains
from mcpo_jax.data.splits import SPLITS
from mcpo_jax.model import ZOO, CheckpointError, LoraSettings, check_checkpoint
from mcpo_jax.model.lora import EXPORTS, TARGETS
from mcpo_jax.model.transformer import ATTENTION_KERNELS, REMAT_POLICIES
from mcpo_jax.objectives import ObjectiveConfig
from mcpo_jax.train import SCHEDULES, OptimConfig, UpdateConfig

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  name: str = "smollm2-135m-instruct"  # HF dir (local or gs://), a .gguf file, or a zoo name
  tokenizer: str = ""  # empty: the tokenizer stored with the model
  dtype: str = "float32"  # compute dtype ("bfloat16" on TPU)
  # Master parameters and optimizer state. float32 even with bfloat16 compute: a bf16 weight keeps 8
  # mantissa bits, so one AdamW step at lr 1e-6 rounds ~98% of the updates away (tests/test_train.py).
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | save_dots
  attention: str = "auto"  # causal attention (training forward, prefill): auto (splash on TPU, else XLA) | xla | splash
  lora: LoraSettings = LoraSettings()  # rank 0: full fine-tuning; else adapters via qwix (model/lora.py)


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  data: int = 1
  fsdp: int = -1  # -1: the rest of the devices
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DataSettings:
  domains: tuple[Domain, ...] = ()  # the ConfigDict holds {name: settings}; default: data.default_domains()
  prompts_per_step: int = 3  # B prompts per RL step, stratified over domains by weight
  max_prompt_tokens: int = 192
  dynamic_sampling: bool = False  # DAPO: drop groups whose rewards all agree, sample more prompts (dynamic_sampling.py)
  max_sampling_rounds: int = 4  # ... in at most this many extra generation rounds per step


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  group_size: int = 6  # G rollouts per prompt
  max_new_tokens: int = 48
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_rows_per_call: int = 0  # rows (prompts × G) per sampler call, bounding its KV cache; 0 = the whole batch
  gather_weights: bool = False  # decode from weights gathered once per call (sampling.decode_weights), not per token
  decode_segments: int = 1  # decode in this many loops, each attending over the cache filled so far (sampling.py)
  mlp_over_fsdp: bool = False  # with gather_weights: decode with the MLP split over fsdp × tensor (sampling.MLP_OVER_FSDP)
  kv_cache: str = "compute"  # "int8": the decode reads half the cache bytes (sampling.DecodePlan.int8_cache)

  @property
  def prompts_per_call(self) -> int | None:
    """Prompts per sampler call (None: the whole batch in one)."""
    return self.max_rows_per_call // self.group_size if self.max_rows_per_call else None


@dataclasses.dataclass(frozen=True)
class RewardSettings:
  processes: int = 2  # verifier worker processes (0: score in this process)
  timeout_s: float = 120.0
  format_weight: float = 0.0
  overlong_buffer: int = 0  # DAPO's overlong shaping: the last N tokens before max_new_tokens cost up to
  overlong_penalty: float = 1.0  # ... this much reward, linearly (0 buffer = off; rewards/overlong.py)
  mask_truncated: bool = False  # DAPO's overlong filtering: rows that hit max_new_tokens are not in the loss
  sandbox: str = "bwrap"  # code runs in kernel namespaces; "unsafe": rlimits + audit hook only


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  steps: int = 10
  epochs: int = 1  # μ passes over each step's rollouts
  minibatches: int = 1  # optimizer steps per epoch (blocks of whole prompt groups)
  micro_batches: int = 1  # gradient accumulation within a minibatch
  logit_chunk: int = 64
  shared_prefix: bool = True  # encode each group's prompt once in the update and the reference pass
  recompute_old_logp: bool = False  # π_old from a teacher-forced pass, not the sampler's log-probs (needed with int8)
  max_nonfinite_steps: int = 3


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  at_start: bool = True
  at_end: bool = True
  every: int = 0  # also every N steps (0 = only start and end)
  split: str = "test"
  prompts_per_domain: int = 8
  k: int = 2  # mean@k with k samples at the rollout temperature (0 = pass@1 only)
  max_new_tokens: int = 48
  prompts_per_call: int = 64  # prompts per evaluation sampler call (its KV cache); each call reads every weight per token


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  every: int = 5
  keep_last: int = 2
  keep_best: int = 1
  best_metric: str = "eval/mean/pass@1"  # "" = keep no best; else an eval/<domain|mean>/<metric>
  preemption_grace_s: float = 25.0  # after SIGTERM, the save starts at the next phase boundary


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
  # metrics.jsonl and TensorBoard event files are always written; a project name adds a Weights & Biases
  # run (in workdir/wandb; WANDB_MODE=offline logs without a network).
  wandb_project: str = ""


@dataclasses.dataclass(frozen=True)
class ChatSettings:
  prompt: str = "What is the capital of France? Answer in one sentence."
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
  preset: str = "default"
  mode: str = "train"  # "train": the RL run; "chat": load the model and answer chat.prompt
  algorithm: str = "mcpo"  # "mcpo" | "grpo"
  seed: int = 0
  workdir: str = "runs/default"
  resume: str = "auto"  # "auto": continue from the newest complete checkpoint in workdir; "none"
  overwrite: bool = False  # with resume="none": move a previous run in workdir aside (to <workdir>.overwritten-*)
  export_hf: bool = True  # write the final policy as an HF directory to workdir/hf_export
  diag_every: int = 5  # D×D per-domain gradient cosines at the first and last step and every N (0 = never)
  model: ModelSettings = ModelSettings()
  mesh: MeshSettings = MeshSettings()
  data: DataSettings = DataSettings()
  rollout: RolloutSettings = RolloutSettings()
  rewards: RewardSettings = RewardSettings()
  objective: ObjectiveConfig = ObjectiveConfig()  # docs/DESIGN.md §4
  optim: OptimConfig = OptimConfig()
  train: TrainSettings = TrainSettings()
  eval: EvalSettings = EvalSettings()
  checkpoint: CheckpointSettings = CheckpointSettings()
  metrics: MetricsSettings = MetricsSettings()
  chat: ChatSettings = ChatSettings()
  source_json: str = "{}"  # the ConfigDict it was built from: what a checkpoint pins

  def to_json(self) -> str:
    return self.source_json

  @property
  def update(self) -> UpdateConfig:
    return UpdateConfig(objective=self.objective, temperature=self.rollout.temperature,
                        micro_batches=self.train.micro_batches, logit_chunk=self.train.logit_chunk,
                        shared_prefix=self.train.shared_prefix)


# Fields that build() fills from other sections, so they are not settings of their own; and the two
# that are mappings in the ConfigDict (so that flags reach inside them) and tuples in a RunConfig.
DERIVED = {"objective": ("algorithm", "group_size"), "optim": ("total_steps", "lm_frozen_updates")}
MAPPINGS = {"data": "domains", "objective": "transfer"}
SECTIONS = {field.name: type(field.default) for field in dataclasses.fields(RunConfig)
            if dataclasses.is_dataclass(field.default)}


def defaults() -> ml_collections.ConfigDict:
  """Every setting with its default: what a config file starts from and a preset overrides."""
  config = ml_collections.ConfigDict()
  for field in dataclasses.fields(RunConfig):
    if field.name == "source_json":
      continue
    value = field.default
    if not dataclasses.is_dataclass(value):
      config[field.name] = value
      continue
    section = ml_collections.ConfigDict()
    for inner in dataclasses.fields(value):
      if inner.name not in DERIVED.get(field.name, ()) and inner.name != MAPPINGS.get(field.name):
        inner_value = getattr(value, inner.name)
        section[inner.name] = (ml_collections.ConfigDict(dataclasses.asdict(inner_value))
                               if dataclasses.is_dataclass(inner_value) else inner_value)
    config[field.name] = section
  config.data.domains = default_domains()
  # Anchor domain -> domains whose correct rollouts may be its positives; unlisted anchors: all.
  config.objective.transfer = ml_collections.ConfigDict()
  return config


# ---------------------------------------------------------------------------------------------
# Validation: (field, test, what to do instead), checked in this order.

positive = lambda v: v > 0
at_least = lambda low: lambda v: v >= low
RANGES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", at_least(0), "use a non-negative integer"),
    ("workdir", bool, "name a directory (local or gs://) for checkpoints and metrics"),
    ("diag_every", at_least(0), "use 0 (never) or a number of steps"),
    ("model.lora.rank", at_least(0), "use 0 (no adapters: every weight trains) or the adapters' rank"),
    ("model.lora.alpha", positive, "use a positive alpha (an adapter adds alpha / rank · A·B to its weight)"),
    ("data.prompts_per_step", positive, "use at least 1"),
    ("data.max_prompt_tokens", positive, "use at least 1"),
    ("data.max_sampling_rounds", at_least(0), "use 0 (no extra rounds) or the most extra generation rounds per step"),
    ("rollout.group_size", at_least(2), "use at least 2: group-relative advantages need two rollouts per prompt"),
    ("rollout.max_new_tokens", positive, "use at least 1"),
    ("rollout.temperature", positive, "use a positive temperature: RL samples, and log-probs divide by it"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "use a value in (0, 1]"),
    ("rollout.top_k", at_least(0), "use 0 (off) or a positive count"),
    ("rollout.max_rows_per_call", at_least(0), "use 0 (one call per batch) or a multiple of rollout.group_size"),
    ("rollout.decode_segments", at_least(1), "use 1 (one decode loop) or more"),
    ("rewards.processes", at_least(0), "use 0 (score in this process) or a number of worker processes"),
    ("rewards.timeout_s", positive, "use a positive number of seconds"),
    ("rewards.format_weight", at_least(0), "use 0 (off) or a positive weight"),
    ("rewards.overlong_buffer", at_least(0), "use 0 (off) or the tokens before max_new_tokens that are penalised"),
    ("rewards.overlong_penalty", at_least(0), "use a non-negative penalty (the reward lost at the token budget)"),
    ("objective.eps_low", lambda v: 0 <= v < 1, "use a value in [0, 1)"),
    ("objective.eps_high", at_least(0), "use a non-negative value"),
    ("objective.dual_clip", lambda v: v > 1, "use a value above 1 (the dual-clip bound −c·A for A < 0)"),
    ("objective.kl_coef", at_least(0), "use 0 (no KL term) or a positive coefficient"),
    ("objective.tau", positive, "use a positive temperature"),
    ("objective.cross_topk", positive, "use at least 1"),
    ("objective.lambda_cross", at_least(0), "use a non-negative weight"),
    ("objective.lambda_in", at_least(0), "use a non-negative weight"),
    ("objective.proj_dim", positive, "use at least 1"),
    ("objective.head_warmup_steps", at_least(0),
     "use 0 (no warm-up) or the number of first RL steps that train the contrastive head alone"),
    ("optim.learning_rate", positive, "use a positive learning rate"),
    ("optim.head_learning_rate", positive, "use a positive learning rate"),
    ("optim.weight_decay", at_least(0), "use a non-negative value"),
    ("optim.b1", lambda v: 0 <= v < 1, "use a value in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "use a value in [0, 1)"),
    ("optim.eps", positive, "use a positive value"),
    ("optim.max_grad_norm", positive, "use a positive norm"),
    ("optim.warmup_steps", at_least(0), "use 0 or a number of optimizer steps"),
    ("train.steps", positive, "use at least 1"),
    ("train.epochs", positive, "use at least 1"),
    ("train.minibatches", positive, "use at least 1"),
    ("train.micro_batches", positive, "use at least 1"),
    ("train.logit_chunk", positive, "use at least 1"),
    ("train.max_nonfinite_steps", positive, "use at least 1"),
    ("eval.every", at_least(0), "use 0 (only start and end) or a number of steps"),
    ("eval.prompts_per_domain", positive, "use at least 1"),
    ("eval.k", at_least(0), "use 0 (greedy pass@1 only) or the samples per prompt for mean@k"),
    ("eval.max_new_tokens", positive, "use at least 1"),
    ("eval.prompts_per_call", positive, "use at least 1"),
    ("checkpoint.every", at_least(0), "use 0 (only the final one) or a number of steps"),
    ("checkpoint.keep_last", positive, "keep at least 1"),
    ("checkpoint.keep_best", at_least(0), "use 0 or a number of checkpoints"),
    ("checkpoint.preemption_grace_s", positive,
     "use the seconds a preemption leaves before the kill (TPU VMs: about 30)"),
    ("chat.max_new_tokens", positive, "use at least 1"),
    ("chat.temperature", at_least(0), "use 0 (greedy) or a positive value"),
    ("chat.top_p", lambda v: 0 < v <= 1, "use a value in (0, 1]"),
    ("chat.top_k", at_least(0), "use 0 (off) or a positive count"),
)
CHOICES = {
    "mode": ("train", "chat"), "algorithm": ("mcpo", "grpo"), "resume": ("auto", "none"),
    "model.dtype": DTYPES, "model.param_dtype": DTYPES, "model.remat": tuple(REMAT_POLICIES),
    "model.attention": ATTENTION_KERNELS, "rollout.kv_cache": ("compute", "int8"),
    "model.lora.export": EXPORTS,
    "rewards.sandbox": ("bwrap", "unsafe"),
    "optim.schedule": SCHEDULES, "eval.split": SPLITS,
}


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  for part in field.split("."):
    config = config[part]
  return config


def _did_you_mean(value: Any, allowed) -> str:
  close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def _choice(field: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"--config.{field}={value!r} is not allowed{_did_you_mean(value, allowed)}; choose one of "
                      f"{list(allowed)}.")


def build(config: ml_collections.ConfigDict) -> RunConfig:
  """The validated RunConfig of `config`; raises ConfigError (or DataError for a domain) naming the field."""
  for field, allowed in CHOICES.items():
    _choice(field, _get(config, field), allowed)
  for field, test, fix in RANGES:
    if not test(_get(config, field)):
      raise ConfigError(f"--config.{field}={_get(config, field)!r}; {fix}.")
  for axis in ("data", "fsdp", "tensor"):
    if config.mesh[axis] != -1 and config.mesh[axis] < 1:
      raise ConfigError(f"--config.mesh.{axis}={config.mesh[axis]}; use a positive size or -1 (the rest of the devices).")
  try:
    check_checkpoint(config.model.name)
  except CheckpointError as error:
    raise ConfigError(f"--config.model.name: {error}") from None
  if config.metrics.wandb_project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"--config.metrics.wandb_project={config.metrics.wandb_project!r} needs wandb: "
                      "pip install wandb==0.31.0, or set it to '' (metrics.jsonl and TensorBoard are always written).")
  tokenizer = config.model.tokenizer
  if tokenizer and "://" not in tokenizer and tokenizer.lower() not in ZOO and not os.path.isdir(tokenizer):
    raise ConfigError(f"--config.model.tokenizer={tokenizer!r} is not a directory; pass the HF checkpoint or "
                      "tokenizer directory, or '' for the model's own tokenizer.")
  _check_lora_targets(config.model.lora.targets)
  domains = tuple(parse_domains(config.data.domains))
  sections = {name: config[name].to_dict() for name in SECTIONS}
  sections["model"]["lora"] = LoraSettings(**sections["model"]["lora"])
  sections["data"]["domains"] = domains
  sections["objective"].update(algorithm=config.algorithm, group_size=config.rollout.group_size,
                               transfer=_transfer(config.objective.transfer.to_dict(), domains))
  try:
    sections["objective"] = ObjectiveConfig(**sections["objective"])
  except ValueError as error:  # its choices: "objective.<field>=...; choose one of ..."
    raise ConfigError(f"--config.{error}") from None
  head_warmup = config.objective.head_warmup_steps if config.algorithm == "mcpo" else 0
  sections["optim"] = OptimConfig(**sections["optim"], total_steps=config.train.steps,
                                  lm_frozen_updates=head_warmup * config.train.epochs * config.train.minibatches)
  run = RunConfig(**{name: value for name, value in config.items() if name not in SECTIONS},
                  **{name: (value if name in ("objective", "optim") else SECTIONS[name](**value))
                     for name, value in sections.items()},
                  source_json=config.to_json())
  if run.rollout.max_rows_per_call % run.rollout.group_size:
    raise ConfigError(f"--config.rollout.max_rows_per_call={run.rollout.max_rows_per_call} is not a multiple of "
                      f"--config.rollout.group_size={run.rollout.group_size}; a call holds whole prompt groups.")
  if run.rollout.mlp_over_fsdp and not run.rollout.gather_weights:
    raise ConfigError("--config.rollout.mlp_over_fsdp=true splits the weights the sampler gathers; set "
                      "--config.rollout.gather_weights=true too.")
  if run.rollout.kv_cache == "int8" and not run.train.recompute_old_logp:
    raise ConfigError("--config.rollout.kv_cache='int8' samples from an approximation of the policy, so its "
                      "log-probs are not π_old's; set --config.train.recompute_old_logp=true too.")
  if run.rewards.overlong_buffer >= run.rollout.max_new_tokens:
    raise ConfigError(f"--config.rewards.overlong_buffer={run.rewards.overlong_buffer} is not below "
                      f"--config.rollout.max_new_tokens={run.rollout.max_new_tokens}; the buffer is the end of the budget.")
  if head_warmup >= run.train.steps:
    raise ConfigError(f"--config.objective.head_warmup_steps={head_warmup} is not below "
                      f"--config.train.steps={run.train.steps}; the LLM would never train.")
  _check_batches(run)
  _check_checkpoint(run)
  return run


def _check_lora_targets(targets: str) -> None:
  """model.lora.targets: a comma-separated list of distinct projection names."""
  names = [name.strip() for name in str(targets).split(",")]
  for name in names:
    if name not in TARGETS:
      raise ConfigError(f"--config.model.lora.targets names {name!r}{_did_you_mean(name, TARGETS)}; use a "
                        f"comma-separated list of {','.join(TARGETS)}.")
  if len(set(names)) < len(names):
    raise ConfigError(f"--config.model.lora.targets={targets!r} names a projection twice; name each once.")


def _transfer(allowed: dict[str, list[str]], domains: tuple[Domain, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """objective.transfer as ((anchor, (source, ...)), ...), every name a domain of data.domains."""
  names = [domain.name for domain in domains]
  for anchor, sources in allowed.items():
    for name in [anchor, *sources]:
      if name not in names:
        raise ConfigError(f"--config.objective.transfer names domain {name!r}{_did_you_mean(name, names)}; known "
                          f"domains: {', '.join(names)}.")
  return tuple((anchor, tuple(sources)) for anchor, sources in sorted(allowed.items()))


def _check_batches(run: RunConfig) -> None:
  """Minibatches are whole prompt groups; micro-batches whole groups too when the prompt is shared."""
  prompts, train = run.data.prompts_per_step, run.train
  if prompts % train.minibatches:
    raise ConfigError(f"--config.train.minibatches={train.minibatches} does not divide --config.data.prompts_per_step="
                      f"{prompts}; minibatches hold whole prompt groups, so pick a divisor of {prompts}.")
  per_minibatch = prompts // train.minibatches
  units, what = (per_minibatch, "prompts") if train.shared_prefix else (per_minibatch * run.rollout.group_size, "rows")
  if units % train.micro_batches:
    raise ConfigError(f"--config.train.micro_batches={train.micro_batches} does not divide the {units} {what} of a "
                      f"minibatch (prompts_per_step / minibatches{'' if train.shared_prefix else ' × group_size'}); "
                      f"pick a divisor of {units}.")


def check_micro_batch_sharding(run: RunConfig, mesh) -> None:
  """On TPU, the rows of one micro-batch must split evenly over the batch-sharding devices (data × fsdp):
  otherwise XLA replicates the micro-batch on every chip (on v6e-256 the update then plans 364 GB). On
  CPU a small test batch may be replicated (mesh.logical_to_spec drops the axis)."""
  if mesh.devices.flat[0].platform != "tpu":
    return
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = run.data.prompts_per_step * run.rollout.group_size // run.train.minibatches  # of one minibatch
  if (rows // run.train.micro_batches) % shards:
    fitting = [m for m in range(1, rows + 1) if rows % m == 0 and (rows // m) % shards == 0]
    raise ConfigError(f"--config.train.micro_batches={run.train.micro_batches}: a micro-batch of "
                      f"{rows // run.train.micro_batches} rows does not split over the {shards} batch-sharding chips "
                      f"(mesh data × fsdp), so every chip would hold all of it; use micro_batches in {fitting} or "
                      "move chips from mesh.fsdp to mesh.tensor.")


def _check_checkpoint(run: RunConfig) -> None:
  """checkpoint.best_metric names an eval metric: found here, not at the first save inside orbax's thread."""
  best = run.checkpoint.best_metric
  if best:
    metrics = ["pass@1"] + ([f"mean@{run.eval.k}"] if run.eval.k > 0 else [])
    allowed = [f"eval/{scope}/{metric}" for scope in ["mean", *(d.name for d in run.data.domains)]
               for metric in metrics]
    if best not in allowed:
      raise ConfigError(f"--config.checkpoint.best_metric={best!r} is not an eval metric"
                        f"{_did_you_mean(best, allowed)}; choose one of {allowed}, or '' to keep no best checkpoint.")
