"""Train state and the jitted, sharded MCPO update step.

One teacher-forced forward over prompt + response gives both the log-probs (LM head applied in
sequence chunks under remat, so [N, T, V] logits never exist) and the pooled hidden states for the
contrastive head. With micro-batches, the batch-global contrastive term is evaluated once on all
pooled representations and its gradient is fed back per micro-batch (gradient caching), so 1 and
M micro-batches give the same update.

Shapes: N rows, P prompt length, T response length, E hidden width, P_z projection width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mcpo_jax.batch import TrainBatch
from mcpo_jax.mesh import from_host, named_sharding
from mcpo_jax.model.lora import has_adapters
from mcpo_jax.model.transformer import Transformer
from mcpo_jax.objectives import ObjectiveConfig, contrastive_term, has_anchor, policy_term, pool_response

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 2e-6
  head_learning_rate: float = 1e-3  # the contrastive head starts from scratch: it needs a larger step
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float = 1.0
  warmup_steps: int = 0
  schedule: str = "constant"  # "constant" | "cosine" (after warm-up)
  total_steps: int = 1000  # the run's train.steps
  lm_frozen_updates: int = 0  # the LLM branch is masked for this many first updates (head warm-up)


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  objective: ObjectiveConfig = ObjectiveConfig()
  temperature: float = 1.0  # the sampler's: log-probs are of logits / temperature
  micro_batches: int = 1
  logit_chunk: int = 64  # response positions per LM-head chunk
  shared_prefix: bool = True  # encode each group's prompt once (forward_rollouts)

  @property
  def prompt_group(self) -> int:
    """Rows per shared prompt in the forward: the group size, or 1 (every row encodes its own prompt)."""
    return self.objective.group_size if self.shared_prefix else 1


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: dict[str, Any]  # {"lm": nnx.State of the trained LLM params, "head": [E, P_z] contrastive head}
  opt_state: Any
  nonfinite_streak: jax.Array  # [] int32: consecutive skipped (non-finite) updates


def _schedule(peak: float, config: OptimConfig) -> optax.Schedule:
  if config.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={config.schedule!r}; choose one of {list(SCHEDULES)}.")
  after = (optax.constant_schedule(peak) if config.schedule == "constant" else
           optax.cosine_decay_schedule(peak, max(1, config.total_steps - config.warmup_steps)))
  if config.warmup_steps <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, config.warmup_steps), after],
                              [config.warmup_steps])


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
  """AdamW with its own learning rate and its own global-norm clip for the LLM and for the contrastive head.

  Separate clips, so the head's gradient (large while the head is new) never rescales the LLM's: with
  repr_grad="head" and coupling="loss" the LLM then moves exactly as under GRPO. During the head
  warm-up the LLM branch is masked: a zero update, and its Adam state and step count untouched.
  """
  def clipped_adamw(lr: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(_schedule(lr, config), b1=config.b1, b2=config.b2, eps=config.eps,
                                   weight_decay=config.weight_decay))
  lm = clipped_adamw(config.learning_rate)
  if config.lm_frozen_updates > 0:
    lm = optax.transforms.conditionally_mask(lm, lambda updates_done: updates_done >= config.lm_frozen_updates)
  labels = lambda params: {"lm": jax.tree.map(lambda _: "lm", params["lm"]), "head": "head"}
  return optax.multi_transform({"lm": lm, "head": clipped_adamw(config.head_learning_rate)}, labels)


def init_train_state(model: Transformer, optimizer: optax.GradientTransformation, *, proj_dim: int = 256,
                     seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
  """Splits the model into (graphdef, trained params) and adds a replicated contrastive head [E, proj_dim].

  A LoRA model trains its adapters only: its base weights (lora.frozen_params) stay out of the state,
  and every function that runs the policy takes them as `frozen`.
  """
  graphdef, lm_params, _ = nnx.split(model, nnx.LoRAParam if has_adapters(model) else nnx.Param, ...)
  hidden = model.config.hidden_size
  head = jax.random.normal(jax.random.key(seed), (hidden, proj_dim), jnp.float32) / jnp.sqrt(hidden)
  if model.mesh is not None:
    head = from_host(head, named_sharding(model.mesh, (None, None), head.shape))
  params = {"lm": lm_params, "head": head}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                     nonfinite_streak=jnp.zeros((), jnp.int32))
  if model.mesh is not None:  # counters and other unsharded leaves: replicate them on the mesh
    replicated = NamedSharding(model.mesh, PartitionSpec())
    on_mesh = lambda x: x if isinstance(x.sharding, NamedSharding) else from_host(x, replicated)
    state = jax.tree.map(on_mesh, state)
  return graphdef, state


def zero_grads(graphdef: nnx.GraphDef, lm_params, frozen=None):
  """Zeros like the trained params, laid out like them on the mesh: the start of a gradient sum. Under jit,
  zeros depend on no input, so nothing tells XLA how to lay them out; as a scan's carry it kept them replicated
  on TPU (Qwen2.5-7B cut to 1 layer on v5e-64: every chip held float32 copies of the whole embedding and head
  gradients, 2 GB each)."""
  mesh = merge_policy(graphdef, lm_params, frozen).mesh
  def zeros(variable):
    value, axes = jnp.zeros_like(variable[...]), getattr(variable, "logical_axes", None)
    if mesh is not None and axes is not None:
      value = jax.lax.with_sharding_constraint(value, named_sharding(mesh, axes, value.shape))
    return variable.replace(value)
  return jax.tree.map(zeros, lm_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def merge_policy(graphdef: nnx.GraphDef, lm_params, frozen=None) -> Transformer:
  """The policy: its trained params, plus a LoRA model's frozen base weights (None: there are none)."""
  return nnx.merge(graphdef, lm_params, *([] if frozen is None else [frozen]))


# ---------------------------------------------------------------------------------------------
# Teacher-forced log-probs


def token_logprobs(model: Transformer, hidden: jax.Array, tokens: jax.Array, temperature: float,
                   chunk: int) -> tuple[jax.Array, jax.Array]:
  """log softmax(head(h) / temperature) at `tokens`, and the entropy, chunked over positions.

  hidden: [N, T, E] states that predict tokens [N, T]. Each chunk's [N, C, V] logits are
  recomputed in the backward pass instead of stored, so memory is linear in T with a small slope.
  """
  n, t, e = hidden.shape
  chunk = min(chunk, t)
  pad = -t % chunk
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(n, -1, chunk, e).swapaxes(0, 1)
  tokens = jnp.pad(tokens, ((0, 0), (0, pad))).reshape(n, -1, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one_chunk(args):
    h, tok = args  # [N, C, E], [N, C]
    logits = model.logits_from_hidden(h) / temperature  # [N, C, V] float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, tok[..., None], axis=-1)[..., 0] - lse
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
    entropy = jax.lax.stop_gradient(lse - jnp.sum(probs * logits, axis=-1))
    return logp, entropy

  logp, entropy = jax.lax.map(one_chunk, (hidden, tokens))  # [T/C, N, C]
  unchunk = lambda x: x.swapaxes(0, 1).reshape(n, -1)[:, :t]
  return unchunk(logp), unchunk(entropy)


def response_states(model: Transformer, prompt_tokens: jax.Array, prompt_mask: jax.Array, tokens: jax.Array,
                    mask: jax.Array, prompt_group: int = 1) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced hidden states of the responses: (the states that predict each response token, the
  response tokens' own states), both [N, T, E]. prompt_tokens, prompt_mask: [N, P]; tokens, mask: [N, T].

  prompt_group G > 1: rows come in groups of G consecutive rows that share one prompt (as rollouts
  do). The prompt is then encoded once per group, [N/G, P], and each response attends to its
  group's prompt keys/values, expanded to [N, K, P, D], and to its own causal prefix. The expansion's
  gradient sums over the group, so values and gradients are those of G separate prompt + response
  rows, with (G − 1)/G of the prompt tokens' layer work saved.
  """
  prompt_len, response_len = prompt_tokens.shape[1], tokens.shape[1]
  if prompt_group == 1:
    ids = jnp.concatenate([prompt_tokens, tokens], axis=1)  # [N, P + T]
    hidden = model(ids, jnp.concatenate([prompt_mask, mask], axis=1), return_logits=False).hidden  # [N, P + T, E]
    return hidden[:, prompt_len - 1:prompt_len + response_len - 1], hidden[:, prompt_len:]
  expand = lambda x: jnp.repeat(x, prompt_group, axis=0)  # [N/G, ...] -> [N, ...]
  prompt = model(prompt_tokens[::prompt_group], prompt_mask[::prompt_group],
                 return_logits=False, return_kv=True)  # hidden [N/G, P, E]
  prefix = prompt.cache.replace(layers=jax.tree.map(expand, prompt.cache.layers),
                                key_mask=expand(prompt.cache.key_mask))  # [N, K, P, D] per layer
  response_hidden = model(tokens, mask, prefix=prefix, return_logits=False).hidden  # [N, T, E]
  # The last prompt state predicts the first response token; response states predict the rest.
  return jnp.concatenate([expand(prompt.hidden[:, -1:]), response_hidden[:, :-1]], axis=1), response_hidden


def forward_rollouts(model: Transformer, batch: TrainBatch, temperature: float, chunk: int, prompt_group: int = 1):
  """Teacher-forced forward over prompt + response -> (logp [N, T], entropy [N, T], pooled response hidden [N, E])
  (prompt_group: see response_states)."""
  predicting, response_hidden = response_states(model, batch.prompt_tokens, batch.prompt_mask, batch.tokens,
                                                batch.mask, prompt_group)
  logp, entropy = token_logprobs(model, predicting, batch.tokens, temperature, chunk)
  return logp, entropy, pool_response(response_hidden, batch.mask)


def sequence_logprobs(graphdef: nnx.GraphDef, lm_params, batch: TrainBatch, frozen=None, *, temperature: float,
                      chunk: int = 64, prompt_group: int = 1, micro_batches: int = 1) -> jax.Array:
  """Log-probs [N, T] of the rollouts under `lm_params` (+ a LoRA model's `frozen` base): the frozen reference's,
  or π_old's recomputed. One micro-batch of N / micro_batches rows (whole prompt groups, strided as the update's)
  at a time."""
  model = merge_policy(graphdef, lm_params, frozen)
  micro = jax.tree.map(lambda x: _split_micro(x, micro_batches, prompt_group), batch)  # [M, N/M, ...]
  logp = jax.lax.map(lambda mb: forward_rollouts(model, mb, temperature, chunk, prompt_group)[0], micro)
  return _merge_micro(logp, prompt_group)  # [N, T]


def jit_sequence_logprobs(graphdef: nnx.GraphDef, config: UpdateConfig, minibatches: int):
  """The jitted teacher-forced pass over a step's whole batch (its `minibatches` × the update's micro-batches):
  (lm_params, batch[, frozen]) -> log-probs [N, T], one update-sized micro-batch at a time. rl_loop runs it for
  the KL reference and, with train.recompute_old_logp, for π_old."""
  return jax.jit(functools.partial(sequence_logprobs, graphdef, temperature=config.temperature,
                                   chunk=config.logit_chunk, prompt_group=config.prompt_group,
                                   micro_batches=minibatches * config.micro_batches))


# ---------------------------------------------------------------------------------------------
# The update


def _split_micro(x: jax.Array, micro: int, group: int = 1) -> jax.Array:
  """[N, ...] -> [M, N/M, ...], micro-batch m holding the groups of `group` consecutive rows m, m+M, m+2M, ...

  Strided, so every micro-batch draws rows from every batch shard and the scan over micro-batches
  needs no resharding; whole groups, so a micro-batch's rows still share their prompts.
  """
  units = x.shape[0] // group
  if units % micro:
    what = f"{units} prompt groups" if group > 1 else f"{x.shape[0]} rows"
    raise ValueError(f"{what} do not split into {micro} micro-batches; make train.micro_batches divide the "
                     f"{'prompts' if group > 1 else 'rows'} per update.")
  x = x.reshape(units // micro, micro, group, *x.shape[1:]).swapaxes(0, 1)  # [M, units/M, group, ...]
  return x.reshape(micro, -1, *x.shape[3:])


def _merge_micro(x: jax.Array, group: int = 1) -> jax.Array:
  """Inverse of _split_micro: [M, N/M, ...] -> [N, ...]."""
  m = x.shape[0]
  x = x.reshape(m, -1, group, *x.shape[2:]).swapaxes(0, 1)  # [units/M, M, group, ...]
  return x.reshape(-1, *x.shape[3:])


def _forward(graphdef: nnx.GraphDef, config: UpdateConfig, frozen, lm_params, batch: TrainBatch):
  """(logp [n, T], entropy [n, T], pooled [n, E]) of `batch`'s rows under lm_params."""
  return forward_rollouts(merge_policy(graphdef, lm_params, frozen), batch, config.temperature, config.logit_chunk,
                          config.prompt_group)


def _micro_loss(outputs, mb: TrainBatch, advantages, pooled_grad, config: UpdateConfig, num_tokens, num_rows):
  """One micro-batch's share of the policy term (global normalisers, so the shares add up), plus, given
  ∂L_contrastive/∂pooled, the surrogate Σ (∂L/∂pooled)·pooled: its gradient w.r.t. the LLM is exactly
  the contrastive term's through this micro-batch. Returns (value, (policy, metrics, entropy sum, pooled))."""
  logp, entropy, pooled = outputs
  policy, metrics = policy_term(logp, mb, advantages, config.objective, num_tokens=num_tokens, num_rows=num_rows)
  surrogate = 0.0 if pooled_grad is None else jnp.sum(pooled_grad * pooled)
  entropy_sum = jnp.sum(jnp.where(mb.loss_mask > 0, entropy, 0.0))
  return policy + surrogate, (policy, metrics, entropy_sum, jax.lax.stop_gradient(pooled))


def _micro_metrics(policy_metrics, entropy_sums, micro_mask, num_tokens) -> dict:
  """Per-micro-batch metrics [M] -> the batch's: token means weighted by tokens; pg_loss and kl, which
  already carry the global normalisers, summed."""
  weights = jnp.sum(micro_mask, axis=(1, 2)) / jnp.maximum(num_tokens, 1)  # [M]
  combine = lambda name, m: jnp.sum(m) if name in ("pg_loss", "kl") else jnp.sum(m * weights)
  return dict({name: combine(name, m) for name, m in policy_metrics.items()},
              entropy=jnp.sum(entropy_sums) / jnp.maximum(num_tokens, 1))


def accumulated_grads(graphdef, params, batch: TrainBatch, transfer, config: UpdateConfig, frozen=None):
  """Plain gradient accumulation over M micro-batches, one forward and backward each: GRPO, and MCPO
  whose contrastive term trains only the head (repr_grad="head", coupling="loss"). That term changes
  neither the LLM's gradient nor the advantages, so it is evaluated after the passes, on the
  representations they computed. Returns (loss, metrics, grads)."""
  objective, group = config.objective, config.prompt_group
  num_tokens, num_rows = jnp.sum(batch.loss_mask), batch.loss_rows
  micro = jax.tree.map(lambda x: _split_micro(x, config.micro_batches, group), batch)  # [M, N/M, ...]

  def accumulate(grads_sum, mb):
    (_, aux), grads = jax.value_and_grad(lambda lm: _micro_loss(
        _forward(graphdef, config, frozen, lm, mb), mb, mb.advantages, None, config, num_tokens, num_rows),
        has_aux=True)(params["lm"])
    return jax.tree.map(jnp.add, grads_sum, grads), aux

  lm_grads, (policy, policy_metrics, entropy_sums, pooled) = jax.lax.scan(
      accumulate, zero_grads(graphdef, params["lm"], frozen), micro)
  loss, metrics = jnp.sum(policy), _micro_metrics(policy_metrics, entropy_sums, micro.loss_mask, num_tokens)
  head_grad = jnp.zeros_like(params["head"])
  if objective.algorithm == "mcpo":
    (contrastive, (_, contrastive_metrics)), head_grad = jax.value_and_grad(
        contrastive_term, argnums=1, has_aux=True)(_merge_micro(pooled, group), params["head"], batch, transfer,
                                                   objective)
    loss, metrics = loss + contrastive, dict(contrastive_metrics, **metrics)
  return loss, metrics, {"lm": lm_grads, "head": head_grad}


def _keeps_last_forward(micro_batches: int) -> bool:
  """Whether gradient caching keeps the last micro-batch's forward (with its residuals) for its backward,
  so that pass 1 re-runs only the others. Not at M = 2: the scan over the one other micro-batch is
  then inlined, and XLA:CPU plans both micro-batches' activations at once (measured 13.3 GB instead of
  8.1 at T = 128, barriers or not)."""
  return micro_batches != 2


def gradient_cached_grads(graphdef, params, batch: TrainBatch, transfer, config: UpdateConfig, frozen=None):
  """MCPO whose contrastive term reaches the LLM (repr_grad="policy") or the advantages (coupling="reward").

  The term couples every pair of rows, so with M micro-batches it is evaluated once on all rows:
  pass 1 computes every pooled representation, then the term's value, advantages and gradients
  w.r.t. the representations and the head; pass 2 accumulates, per micro-batch, the gradient of the
  policy term plus the surrogate Σ (∂L/∂pooled)·pooled. 1 and M micro-batches give the same update.
  The last micro-batch's pass-1 forward is kept for its backward (see _keeps_last_forward), so at M = 1
  there is no extra pass. Returns (loss, metrics, grads).
  """
  objective, group, count = config.objective, config.prompt_group, config.micro_batches
  num_tokens, num_rows = jnp.sum(batch.loss_mask), batch.loss_rows
  split = lambda x: _split_micro(x, count, group)
  merge = lambda x: _merge_micro(x, group)
  kept = int(_keeps_last_forward(count))
  others = count - kept
  micro = jax.tree.map(split, batch)  # [M, N/M, ...]
  head_rows = lambda tree: jax.tree.map(lambda x: x[:others], tree)  # the micro-batches pass 1 re-runs
  forward = functools.partial(_forward, graphdef, config, frozen)

  # Pass 1. A batch without an anchor (e.g. no correct rollout yet) has a zero contrastive term and zero
  # gradients whatever the representations are: it skips the extra forward over the other micro-batches.
  pooled_parts = []
  if others:
    width = params["head"].shape[0]
    # The other micro-batches' forwards, one at a time: [M − kept, N/M, E]. (One forward over all their rows
    # held M − 1 micro-batches' activations at once: 8.4 GB instead of 2.9 per v5e chip at 2 of Qwen2.5-7B's layers.)
    forward_others = lambda: jax.lax.map(lambda mb: forward(params["lm"], mb)[2], head_rows(micro))
    no_pooled = lambda: jnp.zeros((others, batch.num_rows // count, width), jnp.float32)
    pooled_parts.append(jax.lax.cond(has_anchor(batch, transfer, objective), forward_others, no_pooled))
  if kept:
    last = jax.tree.map(lambda x: x[-1], micro)
    last_outputs, last_vjp = jax.vjp(lambda lm: forward(lm, last), params["lm"])
    pooled_parts.append(last_outputs[2][None])
  pooled = merge(jnp.concatenate(pooled_parts))  # [N, E]
  (contrastive, (advantages, contrastive_metrics)), (pooled_grad, head_grad) = jax.value_and_grad(
      contrastive_term, argnums=(0, 1), has_aux=True)(pooled, params["head"], batch, transfer, objective)
  advantages, pooled_grad = split(advantages), split(pooled_grad)  # [M, N/M], [M, N/M, E]

  # Pass 2: the kept micro-batch's backward first (its residuals are released before the scan), then the scan.
  lm_grads, policy, aux = zero_grads(graphdef, params["lm"], frozen), jnp.zeros(()), []
  if kept:
    (_, (policy, *last_aux)), d_outputs = jax.value_and_grad(_micro_loss, has_aux=True)(
        last_outputs, last, advantages[-1], pooled_grad[-1], config, num_tokens, num_rows)
    (lm_grads,) = last_vjp(d_outputs)
    aux = [jax.tree.map(lambda x: x[None], tuple(last_aux))]

  def accumulate(carry, inputs):
    grads_sum, policy_sum = carry
    mb, mb_advantages, mb_pooled_grad = inputs
    (_, (mb_policy, *mb_aux)), grads = jax.value_and_grad(lambda lm: _micro_loss(
        forward(lm, mb), mb, mb_advantages, mb_pooled_grad, config, num_tokens, num_rows), has_aux=True)(params["lm"])
    return (jax.tree.map(jnp.add, grads_sum, grads), policy_sum + mb_policy), tuple(mb_aux)

  if others:
    (lm_grads, policy), others_aux = jax.lax.scan(
        accumulate, (lm_grads, policy), head_rows((micro, advantages, pooled_grad)))
    aux.insert(0, others_aux)  # micro-batch order: others, then the kept last one
  policy_metrics, entropy_sums, _ = jax.tree.map(lambda *parts: jnp.concatenate(parts), *aux)
  metrics = dict(contrastive_metrics, **_micro_metrics(policy_metrics, entropy_sums, micro.loss_mask, num_tokens))
  return policy + contrastive, metrics, {"lm": lm_grads, "head": head_grad}


def loss_and_grads(graphdef, params, batch: TrainBatch, transfer: jax.Array, config: UpdateConfig, frozen=None):
  """(loss, metrics, grads) of the objective (objectives.mcpo_loss) on `batch`, by the strategy it needs;
  `frozen`: a LoRA model's base weights (merge_policy)."""
  objective = config.objective
  head_only = objective.repr_grad == "head" and objective.coupling == "loss"
  strategy = gradient_cached_grads if objective.algorithm == "mcpo" and not head_only else accumulated_grads
  return strategy(graphdef, params, batch, transfer, config, frozen)


def update_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: UpdateConfig,
                state: TrainState, batch: TrainBatch, transfer: jax.Array, frozen=None) -> tuple[TrainState, dict]:
  """One optimizer step on a batch of scored rollouts; skipped (state kept) if anything is non-finite.
  transfer: [D, D] (rl_loop.transfer_matrix); frozen: a LoRA model's base weights (merge_policy)."""
  loss, metrics, grads = loss_and_grads(graphdef, state.params, batch, transfer, config, frozen)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = TrainState(step=state.step + finite.astype(jnp.int32), params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
  return new_state, dict(metrics, loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))


def shard_batch(batch: TrainBatch, mesh: Mesh | None) -> TrainBatch:
  """Rows over (data, fsdp); everything else replicated. Host (NumPy) or global arrays."""
  def place(x):
    if mesh is None:
      return jnp.asarray(x)
    sharding = named_sharding(mesh, ("batch",) + (None,) * (jnp.ndim(x) - 1), jnp.shape(x))
    if isinstance(x, jax.Array):  # already global (e.g. rollouts): a reshard on the same mesh
      return jax.device_put(x, sharding)
    return from_host(x, sharding)
  return jax.tree.map(place, batch)


def deal_minibatches(group_domains: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
  """Whole prompt groups dealt into `count` minibatches, each holding every domain in proportion.

  group_domains: [B] the domain of each group. Returns [count, B/count] group indices. Each domain's
  groups are shuffled, placed at the midpoints of their share of [0, 1) and the merged order is cut
  into equal blocks, so every minibatch holds within one group of B_d/count groups of each domain d:
  mixed GRPO stays mixed in every optimizer step, whatever order the prompts arrived in.
  """
  groups = len(group_domains)
  if groups % count:
    raise ValueError(f"{groups} prompts per step do not split into {count} minibatches of whole groups; "
                     "make config.train.minibatches divide config.data.prompts_per_step.")
  position = np.empty(groups)  # [B] in [0, 1): where each group falls within its domain's share
  for domain in np.unique(group_domains):
    members = rng.permutation(np.flatnonzero(group_domains == domain))
    position[members] = (np.arange(len(members)) + 0.5) / len(members)
  order = np.lexsort((group_domains, position))  # by position, ties by domain
  return order.reshape(count, groups // count)


@jax.jit
def take_rows(batch: TrainBatch, rows: jax.Array) -> TrainBatch:
  """The rows [R] of every [N, ...] entry of the batch (inside jit, so it also works on multi-host arrays)."""
  return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), batch)


def jit_update_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: UpdateConfig,
                    state: TrainState):
  """update_step jitted with the state donated (a LoRA model's frozen base weights are not) and its shardings
  pinned (params never drift): `update(state, batch, transfer[, frozen])`."""
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  step = lambda state, batch, transfer, frozen=None: update_step(graphdef, optimizer, config, state, batch, transfer,
                                                                 frozen)
  return jax.jit(step, donate_argnums=0, out_shardings=(state_shardings, None))
