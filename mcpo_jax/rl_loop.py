"""The RL loop: rollout → rewards → advantages → μ epochs × minibatches of updates, with eval,
metrics, checkpoints, resume and preemption. Every numeric step is a jitted pure function from
sampling.py, objectives.py and train.py; this file only orchestrates them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mcpo_jax.checkpointing import (Preempted, PreemptionGuard, ResumeError, abstract_like, open_checkpoints,
                                    prepare_workdir)
from mcpo_jax.data.batches import PromptBatch, PromptIterator
from mcpo_jax.batch import TrainBatch
from mcpo_jax.config import RunConfig, check_micro_batch_sharding
from mcpo_jax.data.domains import Domain
from mcpo_jax.diagnostics import domain_gradient_cosines
from mcpo_jax.dynamic_sampling import choose_groups, informative_groups, merge_rollouts
from mcpo_jax.evaluation import build_eval_set, evaluate, format_table, write_eval
from mcpo_jax.mesh import make_mesh, to_host
from mcpo_jax.metrics import MetricsWriter, Progress
from mcpo_jax.model import apply_lora, frozen_params, from_pretrained, load_tokenizer, save_pretrained
from mcpo_jax.objectives import grpo_advantages
from mcpo_jax.rewards import RewardPool, ScoreResult, score_held_rows
from mcpo_jax.rewards.overlong import overlong_penalty
from mcpo_jax.sampling import DecodePlan, Rollouts, generate
from mcpo_jax.train import (deal_minibatches, init_train_state, jit_update_step, make_optimizer, merge_policy,
                            jit_sequence_logprobs, shard_batch, take_rows)

PROGRESS_KEYS = ("reward", "accuracy", "loss", "contrastive", "kl", "response_length")  # and the phase times


class TrainingDiverged(RuntimeError):
  pass


def stop_token_ids(tokenizer) -> list[int]:
  """End-of-turn tokens of the usual chat templates that exist in this vocabulary, plus EOS."""
  ids = {tokenizer.eos_token_id}
  for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is not None and token_id != tokenizer.unk_token_id:
      ids.add(token_id)
  return sorted(i for i in ids if i is not None)


def transfer_matrix(domains: Sequence[Domain], allowed: Sequence[tuple[str, Sequence[str]]]) -> np.ndarray:
  """T [D, D]: T[a, b] = 1 if correct rollouts of domain b may be positives for anchors of domain a.

  `allowed` pairs an anchor domain with the domains it may take positives from (objective.transfer,
  whose names the config builder checked); an anchor domain not listed takes them from every domain.
  """
  names = [d.name for d in domains]
  matrix = np.ones((len(names), len(names)), np.float32)
  for anchor, sources in allowed:
    matrix[names.index(anchor)] = [float(n in sources) for n in names]
  return matrix


def _decode(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  return [tokenizer.decode(row[keep.astype(bool)], skip_special_tokens=True) for row, keep in zip(tokens, mask)]


def rollout_metrics(names: Sequence[str], domain_ids: np.ndarray, rewards: np.ndarray, correct: np.ndarray,
                    lengths: np.ndarray, truncated: np.ndarray, group_size: int) -> dict[str, float]:
  """Per-domain and overall rollout statistics; all inputs are host arrays of N = B·G rows."""
  zero_variance = np.repeat(rewards.reshape(-1, group_size).std(axis=1) == 0, group_size)
  metrics = {}
  for prefix, rows in [("", np.ones_like(correct, bool))] + [
      (f"{name}/", domain_ids == d) for d, name in enumerate(names)]:
    if not rows.any():
      continue
    metrics.update({
        f"{prefix}reward": float(rewards[rows].mean()), f"{prefix}accuracy": float(correct[rows].mean()),
        f"{prefix}response_length": float(lengths[rows].mean()), f"{prefix}response_length_max": float(lengths[rows].max()),
        f"{prefix}truncated_frac": float(truncated[rows].mean()),
        f"{prefix}zero_variance_group_frac": float(zero_variance[rows].mean())})
  return metrics


def train(config: RunConfig) -> dict[str, Any]:
  """Runs config.train.steps RL steps (resuming when asked); returns the final evaluation summary."""
  workdir = config.workdir
  prepare_workdir(config)  # refuses an incompatible resume or an overwrite before anything loads
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  check_micro_batch_sharding(config, mesh)
  tokenizer = load_tokenizer(config.model.tokenizer or config.model.name)
  stops = stop_token_ids(tokenizer)
  domains = config.data.domains
  names = [d.name for d in domains]
  transfer = jnp.asarray(transfer_matrix(domains, config.objective.transfer))
  # The data first: a source too small for the eval or a malformed row stops the run before the model loads.
  iterator = PromptIterator(domains, tokenizer, batch_size=config.data.prompts_per_step, seed=config.seed,
                            max_prompt_tokens=config.data.max_prompt_tokens)
  eval_set = build_eval_set(domains, tokenizer, prompts_per_domain=config.eval.prompts_per_domain,
                            split=config.eval.split, max_prompt_tokens=config.data.max_prompt_tokens)
  model = from_pretrained(config.model.name, mesh=mesh, dtype=config.model.dtype,
                          param_dtype=config.model.param_dtype, remat=config.model.remat,
                          attention=config.model.attention)
  reference_graphdef = None  # the KL reference's structure: a LoRA model's base with the adapters off
  if config.model.lora.rank:
    model, reference_graphdef = apply_lora(model, config.model.lora, seed=config.seed)

  group = config.rollout.group_size
  optimizer = make_optimizer(config.optim)  # its LLM branch frozen for the head warm-up's updates
  update_config = config.update
  graphdef, state = init_train_state(model, optimizer, proj_dim=config.objective.proj_dim, seed=config.seed)
  frozen = frozen_params(model)  # a LoRA model's base weights (None without adapters): not trained, not saved
  del model  # the train state (and `frozen`) own the parameters from here on
  # The KL reference: the base weights themselves for LoRA, else a copy of the initial policy in the compute
  # dtype (every matmul casts to it anyway, so its log-probs are the same).
  compute = jnp.dtype(config.model.dtype)
  reference = None if config.objective.kl_coef == 0 else (
      frozen if reference_graphdef is not None else
      jax.tree.map(lambda x: jnp.copy(x).astype(compute), state.params["lm"]))
  update = jit_update_step(graphdef, optimizer, update_config, state)
  logprobs = jit_sequence_logprobs(reference_graphdef or graphdef, update_config, config.train.minibatches)
  policy_logprobs = jit_sequence_logprobs(graphdef, update_config, config.train.minibatches)  # π_old recomputed

  checkpointer = open_checkpoints(config)
  start_step = 0
  if config.resume == "auto":
    try:
      restored = checkpointer.restore_latest(abstract_like(state), config)
    except ResumeError:
      checkpointer.close()  # an open manager's threads would print a traceback at exit
      raise
    if restored is not None:
      start_step, state, extra = restored
      evaluations_file = epath.Path(workdir) / "evaluations.json"
      if start_step >= config.train.steps and (extra.get("final") or evaluations_file.exists()):  # nothing left
        checkpointer.close()
        print(f"the run in {workdir} is complete (step {start_step}); raise --config.train.steps to continue it")
        return json.loads(evaluations_file.read_text()) if evaluations_file.exists() else {}
      iterator.set_state(extra["data"])
      print(f"resumed from {workdir}/checkpoints at step {start_step}")

  writer = MetricsWriter(workdir, start_step=start_step, wandb_project=config.metrics.wandb_project,
                         config_json=config.to_json())
  progress = Progress(config.train.steps, start_step)
  key = jax.random.key(config.seed)
  evaluations: dict[str, dict[str, float]] = {}
  with RewardPool(config.rewards.processes, timeout_s=config.rewards.timeout_s,
                  format_weight=config.rewards.format_weight, sandbox=config.rewards.sandbox) as pool, \
      PreemptionGuard(config.checkpoint.preemption_grace_s) as preemption:

    def run_eval(label: str, step: int) -> dict[str, float]:
      policy = merge_policy(graphdef, state.params["lm"], frozen)
      summary, records = evaluate(policy, tokenizer, eval_set, pool, max_new_tokens=config.eval.max_new_tokens,
                                  k=config.eval.k, temperature=config.rollout.temperature, stop_token_ids=stops,
                                  key=jax.random.fold_in(key, 1_000_003), label=f"eval at step {step}",
                                  batch_size=config.eval.prompts_per_call,
                                  plan=DecodePlan.of(config.rollout).exact())
      write_eval(workdir, step, summary, records)
      writer.write(step, summary)
      evaluations[label] = summary
      return summary

    def save(step: int, data_state: dict, metrics: dict[str, float] | None = None, **marks) -> None:
      checkpointer.save(step, state, {"data": data_state, "config": config.to_json(), **marks}, metrics=metrics)

    def stop_if_preempted(step: int, data_state: dict) -> None:
      """Between the phases of step `step` + 1 (state still that of step `step`): on a signal, save and stop."""
      if preemption.requested:
        preemption.saving()
        if step > 0 and step not in checkpointer.steps():
          save(step, data_state)
        checkpointer.close()
        raise Preempted(step, f"{workdir}/checkpoints")

    if config.eval.at_start and start_step == 0:
      run_eval("start", 0)
    elif start_step and extra.get("eval_due"):  # the preempted run skipped this step's eval
      run_eval(f"step {start_step}", start_step)
    last_diag_rewards: dict[str, float] = {}  # per domain, at the previous diagnostics step
    def sample_round(step: int, round_index: int, data_before: dict) -> SampledRound:
      """The next B prompts of the iterator, rolled out G times by the current policy and scored. Round 0 is
      the step's batch; dynamic sampling's extra rounds draw with their own key."""
      started = time.perf_counter()
      prompts = next(iterator)
      round_key = key if round_index == 0 else jax.random.fold_in(key, round_index)
      rollouts = collect_rollouts(merge_policy(graphdef, state.params["lm"], frozen), prompts, config, tokenizer,
                                  stops, round_key, step)
      rolled = time.perf_counter()
      stop_if_preempted(step, data_before)
      scored = score_rollouts(pool, tokenizer, rollouts, prompts.examples, group)
      stop_if_preempted(step, data_before)
      lengths = to_host(rollouts.lengths)  # [B·G] host copy
      rewards = scored.rewards.astype(np.float32) + overlong_penalty(  # [B·G] verifier + DAPO's length shaping
          lengths, config.rollout.max_new_tokens, config.rewards.overlong_buffer, config.rewards.overlong_penalty)
      return SampledRound(rollouts, scored, rewards, np.repeat(prompts.domain_id, group), lengths,
                          to_host(rollouts.truncated), rollout_s=rolled - started, reward_s=time.perf_counter() - rolled)

    for step in range(start_step, config.train.steps):
      started = time.perf_counter()
      data_before = iterator.get_state()  # the last completed step's, saved if a signal stops this one
      rounds = [sample_round(step, 0, data_before)]
      while (config.data.dynamic_sampling and len(rounds) <= config.data.max_sampling_rounds and
             informative_groups(_joined(rounds, "rewards"), group).sum() < config.data.prompts_per_step):
        rounds.append(sample_round(step, len(rounds), data_before))
      sampled = time.perf_counter()
      if config.data.dynamic_sampling:
        rollouts, rewards, correct, domain_ids, trained, sampling = informative_batch(rounds, config,
                                                                                      tokenizer.pad_token_id)
      else:
        (only,) = rounds
        rollouts, rewards, correct, domain_ids, trained, sampling = (only.rollouts, only.rewards, only.scored.correct,
                                                                     only.domain_ids, None, {})
      batch = train_batch(rollouts, rewards, correct, domain_ids, config, mesh, trained_groups=trained)
      if config.train.recompute_old_logp:  # π_old as the update's own forward computes it, not as sampled
        sampled_logp, batch = batch.old_logp, batch.replace(old_logp=policy_logprobs(state.params["lm"], batch, frozen))
        sampling["sampling/logp_gap"] = float(jnp.sum(jnp.abs(batch.old_logp - sampled_logp) * batch.mask) /
                                             jnp.maximum(jnp.sum(batch.mask), 1))
      if reference is not None:
        batch = batch.replace(ref_logp=logprobs(reference, batch))
      state, update_metrics = update_policy(state, batch, domain_ids, functools.partial(update, frozen=frozen),
                                            transfer, config, step, mesh,
                                            before_first=lambda: stop_if_preempted(step, data_before))
      updated = time.perf_counter()

      # Rollout statistics over every row sampled this step (with dynamic sampling, the dropped groups too).
      step_metrics = rollout_metrics(names, *(_joined(rounds, name) for name in (
          "domain_ids", "rewards", "correct", "lengths", "truncated")), group)
      scored = [r.scored for r in rounds]
      step_metrics.update(update_metrics, **sampling, verifier_errors=float(sum(s.errors for s in scored)),
                          untrusted_code_tests=float(sum(s.untrusted_tests for s in scored)),
                          rollout_s=sum(r.rollout_s for r in rounds), reward_s=sum(r.reward_s for r in rounds),
                          update_s=updated - sampled, step_s=updated - started)
      first, final = step == 0, step + 1 == config.train.steps
      diag_due = config.diag_every and (first or final or (step + 1) % config.diag_every == 0)  # start, every N, end
      if diag_due and not preemption.requested:
        step_metrics.update(interference_metrics(graphdef, state, frozen, batch, transfer, config, step_metrics,
                                                 last_diag_rewards))
        last_diag_rewards = {n: step_metrics[f"{n}/reward"] for n in names if f"{n}/reward" in step_metrics}
      errors = [s for s in scored if s.errors]
      if errors:
        logging.warning("step %d: %d verifier errors, e.g. %s", step + 1, sum(s.errors for s in errors),
                        errors[0].first_error)
      writer.write(step + 1, step_metrics)
      progress.update(step + 1, step_metrics, PROGRESS_KEYS)

      if int(to_host(state.nonfinite_streak)) >= config.train.max_nonfinite_steps:
        checkpointer.close()
        raise TrainingDiverged(f"{config.train.max_nonfinite_steps} consecutive updates had a non-finite loss or "
                               "gradient; lower the learning rate or check the data (see metrics.jsonl).")
      eval_due = bool(config.eval.every and (step + 1) % config.eval.every == 0 and step + 1 < config.train.steps)
      if preemption.requested:  # the step is complete: save it now, its eval (if due) runs on resume
        preemption.saving()
        save(step + 1, iterator.get_state(), eval_due=eval_due)
        checkpointer.close()
        raise Preempted(step + 1, f"{workdir}/checkpoints")
      eval_metrics = run_eval(f"step {step + 1}", step + 1) if eval_due else None
      periodic = config.checkpoint.every and (step + 1) % config.checkpoint.every == 0
      if periodic and not final:  # the final one is saved after the last eval
        save(step + 1, iterator.get_state(), metrics=eval_metrics)

    summary = run_eval("end", config.train.steps) if config.eval.at_end else None
    if config.train.steps not in checkpointer.steps():  # present when a preemption saved the last step
      save(config.train.steps, iterator.get_state(), metrics=summary, final=True)
  checkpointer.close()
  writer.close()
  finish(config, evaluations, merge_policy(graphdef, state.params["lm"], frozen), tokenizer)
  return evaluations


def finish(config: RunConfig, evaluations: dict[str, dict[str, float]], policy, tokenizer) -> None:
  """The end of a run: the before/after tables, the HF export and evaluations.json (the mark of completion)."""
  if evaluations and jax.process_index() == 0:
    print(format_table(evaluations, "pass@1"))
    if config.eval.k > 0:
      print(format_table(evaluations, f"mean@{config.eval.k}"))
  if config.export_hf:
    lora = config.model.lora
    save_pretrained(policy, f"{config.workdir}/hf_export", tokenizer,
                    adapters_only=bool(lora.rank) and lora.export == "adapters")
  if jax.process_index() == 0:
    (epath.Path(config.workdir) / "evaluations.json").write_text(json.dumps(evaluations, indent=2))


# ---------------------------------------------------------------------------------------------
# The phases of one RL step


@dataclasses.dataclass(frozen=True)
class SampledRound:
  """One generation round of a step: B prompts rolled out G times and scored. Host arrays are [B·G]."""
  rollouts: Rollouts
  scored: ScoreResult
  rewards: np.ndarray  # float32 verifier reward + overlong shaping
  domain_ids: np.ndarray  # int32
  lengths: np.ndarray  # int32 response lengths
  truncated: np.ndarray  # bool: hit max_new_tokens without a stop token
  rollout_s: float
  reward_s: float

  @property
  def correct(self) -> np.ndarray:
    return self.scored.correct


def _joined(rounds: Sequence[SampledRound], field: str) -> np.ndarray:
  """One [B·G] field of every round, concatenated: [R·B·G]."""
  return np.concatenate([getattr(r, field) for r in rounds])


def informative_batch(rounds: Sequence[SampledRound], config: RunConfig, pad_id: int):
  """Dynamic sampling's batch: the step's B groups out of every round's (dynamic_sampling.choose_groups).
  Returns host (rollouts [B·G, ...], rewards, correct, domain_ids [B·G], trained [B] bool, metrics)."""
  group = config.rollout.group_size
  informative = informative_groups(_joined(rounds, "rewards"), group)  # [R·B]
  chosen, trained = choose_groups(informative, config.data.prompts_per_step)  # [B], [B]
  rows = (chosen[:, None] * group + np.arange(group)).reshape(-1)  # [B·G]
  rollouts = jax.tree.map(lambda x: x[rows], merge_rollouts([r.rollouts for r in rounds], pad_id))
  metrics = {"sampling/extra_rounds": len(rounds) - 1, "sampling/informative_groups": int(informative.sum()),
             "sampling/dropped_groups": int((~informative).sum()), "sampling/padded_groups": int((~trained).sum())}
  return (rollouts, *(_joined(rounds, name)[rows] for name in ("rewards", "correct", "domain_ids")), trained,
          metrics)


def collect_rollouts(policy, prompts: PromptBatch, config: RunConfig, tokenizer, stops: Sequence[int],
                     key: jax.Array, step: int):
  """G sampled responses per prompt: Rollouts with [B·G, ...] global arrays, a prompt's rows consecutive.

  With rollout.max_rows_per_call, the prompts go to the sampler in calls of that many rows (the KV cache
  of one call is what must fit); call c > 0 draws with the key folded with c, so every call samples anew."""
  rollout = config.rollout
  per_call = rollout.prompts_per_call or len(prompts.prompt_tokens)
  parts = []
  for call, start in enumerate(range(0, len(prompts.prompt_tokens), per_call)):
    parts.append(generate(policy, prompts.prompt_tokens[start:start + per_call],
                          prompts.prompt_mask[start:start + per_call], group_size=rollout.group_size,
                          max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
                          top_k=rollout.top_k, stop_token_ids=stops, key=key if call == 0 else jax.random.fold_in(
                              key, call), step=step, pad_id=tokenizer.pad_token_id,
                          plan=DecodePlan.of(rollout)))
  rollouts = parts[0] if len(parts) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  return jax.block_until_ready(rollouts)  # dispatch is asynchronous: the rollout's time is spent here, not later


def score_rollouts(pool: RewardPool, tokenizer, rollouts, examples: Sequence[dict], group: int):
  """Each response decoded and judged by its domain's verifier (code in the sandbox): the pool's ScoreResult,
  the same on every host; each host verifies only the rows it holds (rewards.held_rows)."""
  texts = _decode(tokenizer, to_host(rollouts.tokens), to_host(rollouts.response_mask))
  repeated = [example for example in examples for _ in range(group)]
  return score_held_rows(pool, texts, repeated, [example["verifier"] for example in repeated], rollouts.tokens)


def train_batch(rollouts, rewards: np.ndarray, correct: np.ndarray, domain_ids: np.ndarray, config: RunConfig, mesh,
                trained_groups: np.ndarray | None = None) -> TrainBatch:
  """The scored rollouts [N, ...], with their (shaped) rewards, verdicts and domains [N], as the update's
  TrainBatch, rows sharded over the mesh; ref_logp = old_logp until the reference pass replaces it.

  Rows outside the loss (TrainBatch.in_loss): with rewards.mask_truncated, those that hit max_new_tokens
  (DAPO's overlong filtering); with `trained_groups` [N/G] bool, the groups it marks False (dynamic
  sampling's padding). The advantages use every row of a group, in the loss or not.
  """
  group = config.rollout.group_size
  in_loss = None  # every row
  if config.rewards.mask_truncated:
    in_loss = ~to_host(rollouts.truncated)
  if trained_groups is not None:
    in_loss = np.repeat(trained_groups, group) & (True if in_loss is None else in_loss)
  advantages = grpo_advantages(jnp.asarray(rewards), group, normalize_std=config.objective.normalize_std)
  return shard_batch(TrainBatch(
      prompt_tokens=rollouts.prompt_tokens, prompt_mask=rollouts.prompt_mask, tokens=rollouts.tokens,
      mask=rollouts.response_mask, old_logp=rollouts.logprobs, ref_logp=rollouts.logprobs, rewards=rewards,
      correct=correct.astype(np.int32), advantages=np.asarray(advantages),
      group_ids=np.repeat(np.arange(len(rewards) // group, dtype=np.int32), group),
      domain_ids=domain_ids.astype(np.int32),
      in_loss=None if in_loss is None else in_loss.astype(np.int32)), mesh)


def update_policy(state, batch: TrainBatch, domain_ids: np.ndarray, update, transfer: jax.Array, config: RunConfig,
                  step: int, mesh, before_first) -> tuple[Any, dict[str, float]]:
  """train.epochs passes over the batch, each train.minibatches optimizer steps; returns the new state and
  the updates' mean metrics. domain_ids: [N] host copy of the batch's. `before_first` runs before the first
  update (after it, the old state is donated)."""
  update_metrics = []
  for epoch in range(config.train.epochs):
    dealer = np.random.default_rng([config.seed, step, epoch])  # a pure function of the step: resume deals the same
    for minibatch in _minibatches(batch, config.train.minibatches, config.rollout.group_size, domain_ids, dealer,
                                  mesh):
      if not update_metrics:
        before_first()
      state, metrics = update(state, minibatch, transfer)
      update_metrics.append(metrics)
  return state, jax.tree.map(lambda *xs: float(np.mean([to_host(x) for x in xs])), *update_metrics)


def interference_metrics(graphdef, state, frozen, batch: TrainBatch, transfer: jax.Array, config: RunConfig,
                         step_metrics: dict[str, float], last_rewards: dict[str, float]) -> dict[str, Any]:
  """diag/grad_cosine [D, D] and, per domain, the reward change since the previous diagnostics step."""
  names = [domain.name for domain in config.data.domains]
  out = {"diag/grad_cosine": domain_gradient_cosines(graphdef, state.params, batch, transfer, config.update,
                                                     len(names), frozen, config.train.minibatches)}
  for name in names:
    if f"{name}/reward" in step_metrics and name in last_rewards:
      out[f"diag/{name}/reward_delta"] = step_metrics[f"{name}/reward"] - last_rewards[name]
  return out


def _minibatches(batch: TrainBatch, count: int, group: int, domain_ids: np.ndarray,
                 rng: np.random.Generator, mesh):
  """`count` minibatches of whole prompt groups (the contrastive term and the reward coupling need groups),
  every domain in each in proportion (train.deal_minibatches). domain_ids: [N] host copy of the batch's."""
  if count == 1:
    yield batch
    return
  for groups in deal_minibatches(domain_ids[::group], count, rng):
    rows = (groups[:, None] * group + np.arange(group)).reshape(-1)  # [B/count · G]
    yield shard_batch(take_rows(batch, rows), mesh)
