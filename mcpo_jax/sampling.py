"""Grouped rollout sampler: prefill each prompt once, decode its G rows against that one copy, in one loop.

The whole generation is one jitted program: the prefill, and a `lax.while_loop` that samples a token per
row, feeds it back through the model, and exits as soon as every row has stopped. A prompt's keys and
values are held once, [B, K, P, D] per layer, and its G rows read them there at every step; each row's
cache holds only its own T response slots (created inside the program, so XLA updates it in place). A
decode step thus reads B·P + N·T cache slots, not N·(P + T), and only the current step's [N, V] logits
ever exist. With `DecodePlan.segments` = n the loop is n loops in a row, each attending only over the
response slots filled by its end (the first j·T/n): the decode reads (T(n+1)/2n) / T of the response slots
one loop reads, for n loop bodies' compile time. Generation lengths are bucketed to powers of two and
prompt lengths to 2^k or 1.5·2^k (a 90-token prompt runs at 96, not 128), so the compiled programs are
few and reused (`compile_count()` tells how many were built).

Shapes: B prompts, G rollouts per prompt, N = B·G rows, P prompt length, T new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mcpo_jax.mesh import axis_rules, constrain, from_host, named_sharding
from mcpo_jax.model.transformer import CACHE_AXES, Transformer

MAX_STOP_TOKENS = 8  # stop ids are padded to this length so their number never triggers a recompile
MIN_PROMPT_BUCKET = 16
DECODE_GATHERED = ("embed",)  # the logical axes (FSDP's) that decode_weights gathers; mcpo_jax.aot lays them out too
# rollout.mlp_over_fsdp: the sampler traces under these rules. The gathered MLP weights split their hidden
# dimension over fsdp × tensor (a chip reads 1/(fsdp·tensor) of them per token, not 1/tensor), and the MLP's rows
# are all-gathered over fsdp before it and reduce-scattered after: activations move instead of weights, which
# pays while fsdp is small (data × fsdp × tensor with fsdp ~4). Attention and the KV cache keep their layout.
MLP_OVER_FSDP = {"mlp_rows": ("data",), "mlp": ("fsdp", "tensor")}
_compiles = 0


@flax.struct.dataclass
class Rollouts:
  """Rows of one prompt are consecutive: row r belongs to prompt r // G."""

  tokens: jax.Array  # [N, T] int32 response tokens; pad id after a row stopped
  logprobs: jax.Array  # [N, T] float32 log-softmax(logits / temperature) at the sampled token; 0 where masked
  response_mask: jax.Array  # [N, T] int32, 1 up to and including the stop token
  lengths: jax.Array  # [N] int32 response lengths (sum of the mask)
  truncated: jax.Array  # [N] bool, the row hit max_new_tokens without a stop token
  prompt_tokens: jax.Array  # [N, P] int32 left-padded prompt of each row
  prompt_mask: jax.Array  # [N, P] int32


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """How the sampler runs its decode; every plan but int8_cache samples the same tokens (config:
  rollout.gather_weights, rollout.decode_segments, rollout.mlp_over_fsdp, rollout.kv_cache).

  gather_weights: decode from `decode_weights` (FSDP's shards gathered once per call, not at every token).
  segments: decode in that many loops, each attending over the cache filled so far (fewer cache reads).
  mlp_over_fsdp (with gather_weights): trace under MLP_OVER_FSDP's axis rules.
  int8_cache: hold the rows' response slots as int8 with a scale per slot and head (model.LayerKV): a decode step
    reads half the cache bytes. Not the same tokens: the logits move by the quantization error, so the sampler's
    log-probs are no longer π_old's (rl_loop recomputes them: train.recompute_old_logp). The prompts' keys, read
    once per prompt, stay in the compute dtype.
  """

  gather_weights: bool = False
  segments: int = 1
  mlp_over_fsdp: bool = False
  int8_cache: bool = False

  def __post_init__(self):
    if self.segments < 1:
      raise ValueError(f"decode segments={self.segments}; it must be at least 1.")
    if self.mlp_over_fsdp and not self.gather_weights:
      raise ValueError("mlp_over_fsdp splits the gathered weights; it needs gather_weights=True.")

  @classmethod
  def of(cls, rollout) -> DecodePlan:
    """The plan a run's `config.RolloutSettings` asks for."""
    return cls(bool(rollout.gather_weights), int(rollout.decode_segments), bool(rollout.mlp_over_fsdp),
               rollout.kv_cache == "int8")

  def exact(self) -> DecodePlan:
    """This plan with the cache in the compute dtype: what evaluation decodes with (it measures the policy)."""
    return dataclasses.replace(self, int8_cache=False)

  @property
  def rules(self) -> dict:
    """The logical-axis overrides the decode traces under (mcpo_jax.aot lowers its decode steps under them too)."""
    return MLP_OVER_FSDP if self.mlp_over_fsdp else {}


def compile_count() -> int:
  """How many sampling programs have been traced and compiled in this process."""
  return _compiles


def next_power_of_two(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prompt_bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
  """The smallest 2^k or 1.5·2^k ≥ n: at most 2 programs per octave, at most 1/3 of the prompt wasted."""
  power = next_power_of_two(n, minimum)
  three_quarters = 3 * power // 4
  return three_quarters if three_quarters >= max(n, minimum) and power >= 2 * minimum else power


def filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array | float | None) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf. logits: [..., V] (already / T).

  top-k keeps every logit >= the k-th largest; top-p keeps every logit >= the smallest logit of the
  shortest descending prefix whose probability mass reaches top_p (ties at a threshold are kept).
  """
  neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, neg_inf)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly larger logits
    kept = mass_before < top_p
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, neg_inf)
  return logits


def decode_segment_ends(length_bucket: int, segments: int) -> tuple[int, ...]:
  """The decode step at which each of `segments` loops ends (the last at length_bucket)."""
  return tuple(sorted({-(-length_bucket * j // segments) for j in range(1, segments + 1)}))


def decode_weights(state: nnx.State, mesh, dtype) -> nnx.State:
  """The sampler's copy of the model's weights: in the compute dtype (what every use casts them to, so the
  numbers are the same), with their FSDP dimension ("embed") gathered. The decode loop then reads local
  weights instead of all-gathering every weight at every token. It is made once per sampler call and costs
  num_params × dtype bytes / tensor-parallel size per chip. Variables without logical axes (LoRA's) stay."""
  def gathered(variable):
    axes = getattr(variable, "logical_axes", None)
    if not isinstance(variable, nnx.Param) or axes is None:
      return variable
    value = variable[...]
    if jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(dtype)
    if mesh is not None:
      layout = named_sharding(mesh, axes, value.shape, replicated=DECODE_GATHERED)
      value = jax.lax.with_sharding_constraint(value, layout)
    return variable.replace(value)
  return jax.tree.map(gathered, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _sample_program(graphdef, state, prompt_tokens, prompt_mask, key, max_new_tokens, temperature, top_p, stop_ids,
                    *, group_size: int, length_bucket: int, greedy: bool, top_k: int, use_top_p: bool,
                    pad_id: int, plan: DecodePlan):
  """The jitted generation. prompt_tokens, prompt_mask: [B, P]; returns Rollouts with T = length_bucket."""
  global _compiles
  _compiles += 1  # runs once per trace, i.e. once per compiled program
  model: Transformer = nnx.merge(graphdef, state)
  mesh = model.mesh
  if plan.gather_weights:
    state = decode_weights(state, mesh, model.dtype)
    model = nnx.merge(graphdef, state)
  b, p = prompt_tokens.shape
  n = b * group_size

  # Prefill once per prompt. The prompt's keys stay one copy per prompt, which its G rows read at every step
  # (model: `prefix` with a cache); a row's cache holds its own response slots only.
  prefill = model(prompt_tokens, prompt_mask, return_logits=False, return_kv=True)
  stored = lambda x: constrain(x, mesh, CACHE_AXES)
  prompt = prefill.cache.replace(layers=jax.tree.map(stored, prefill.cache.layers))  # [B, K, P, D] per layer
  cache = model.init_cache(n, length_bucket, jnp.int8 if plan.int8_cache else None)  # [N, K, T, D] per layer
  repeat = lambda x: jnp.repeat(x, group_size, axis=0) if x.ndim else x
  logits = repeat(model.logits_from_hidden(prefill.hidden[:, -1:])[:, 0])  # [N, V]

  row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(n))  # [N] keys
  batch_axes = ("batch", "length")
  state0 = dict(
      t=jnp.zeros((), jnp.int32), cache=cache, logits=constrain(logits, mesh, ("batch", "vocab")),
      tokens=constrain(jnp.full((n, length_bucket), pad_id, jnp.int32), mesh, batch_axes),
      logprobs=constrain(jnp.zeros((n, length_bucket), jnp.float32), mesh, batch_axes),
      mask=constrain(jnp.zeros((n, length_bucket), jnp.int32), mesh, batch_axes),
      done=jnp.zeros((n,), bool), stopped=jnp.zeros((n,), bool))

  def keep_going(s):
    return (s["t"] < max_new_tokens) & ~jnp.all(s["done"])

  def step(s):
    t = s["t"]
    scaled = s["logits"] / temperature  # [N, V] float32
    if greedy:
      token = jnp.argmax(scaled, axis=-1)
    else:
      filtered = filter_logits(scaled, top_k, top_p if use_top_p else None)
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys)
      token = jax.vmap(jax.random.categorical)(step_keys, filtered)
    token = token.astype(jnp.int32)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)[:, 0]
    active = ~s["done"]
    token = jnp.where(active, token, pad_id)
    hit_stop = active & jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
    out = dict(
        t=t + 1,
        tokens=s["tokens"].at[:, t].set(token),
        logprobs=s["logprobs"].at[:, t].set(jnp.where(active, logprob, 0.0)),
        mask=s["mask"].at[:, t].set(active.astype(jnp.int32)),
        stopped=s["stopped"] | hit_stop,
        done=s["done"] | hit_stop | (t + 1 >= max_new_tokens))
    # Feed the token back; the final iteration's forward is wasted but keeps the loop branch-free. The model
    # is merged inside the loop's trace: a module may not be mutated across traces, and qwix's LoRA einsum
    # records a string on its module at every call (model/lora.py).
    fed = nnx.merge(graphdef, state)(token[:, None], jnp.ones((n, 1), jnp.int32), cache=s["cache"], prefix=prompt,
                                     return_logits=False)
    out["cache"] = fed.cache
    out["logits"] = constrain(model.logits_from_hidden(fed.hidden)[:, 0], mesh, ("batch", "vocab"))
    return out

  final = state0
  for end in decode_segment_ends(length_bucket, plan.segments):  # slots [0, end) hold every token by `end`
    final = dict(final, cache=final["cache"].replace(visible=end))
    final = jax.lax.while_loop(lambda s, end=end: keep_going(s) & (s["t"] < end), step, final)
  lengths = jnp.sum(final["mask"], axis=-1)
  return Rollouts(
      tokens=final["tokens"], logprobs=final["logprobs"], response_mask=final["mask"], lengths=lengths,
      truncated=~final["stopped"] & (lengths >= max_new_tokens),
      prompt_tokens=repeat(prompt_tokens), prompt_mask=repeat(prompt_mask))


@functools.lru_cache(maxsize=None)
def _jitted(group_size, length_bucket, greedy, top_k, use_top_p, pad_id, plan):
  return jax.jit(axis_rules(plan.rules)(functools.partial(
      _sample_program, group_size=group_size, length_bucket=length_bucket, greedy=greedy, top_k=top_k,
      use_top_p=use_top_p, pad_id=pad_id, plan=plan)),
      static_argnums=0)  # traced under the decode's axis rules


def generate_program(*, group_size: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                     stop_token_ids: Sequence[int], pad_id: int, plan: DecodePlan = DecodePlan()):
  """The jitted program `generate` runs, and its trailing arguments: the program is called as
  program(graphdef, model_state, prompt_tokens, prompt_mask, key, *settings) (mcpo_jax.aot lowers it)."""
  stop_ids = np.full((MAX_STOP_TOKENS,), -1, np.int32)
  stop_ids[:len(stop_token_ids)] = list(stop_token_ids)
  greedy = temperature == 0
  program = _jitted(group_size, next_power_of_two(max_new_tokens), greedy, int(top_k), top_p < 1.0, int(pad_id), plan)
  settings = (np.int32(max_new_tokens), np.float32(1.0 if greedy else temperature), np.float32(top_p), stop_ids)
  return program, settings


def generate(model: Transformer, prompt_tokens, prompt_mask, *, group_size: int = 1, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             stop_token_ids: Sequence[int] = (), key: jax.Array, step: int = 0, pad_id: int = 0,
             plan: DecodePlan = DecodePlan()) -> Rollouts:
  """Samples `group_size` responses for each left-padded prompt.

  prompt_tokens, prompt_mask: [B, P] (left padding). temperature=0 is greedy. The key is folded with
  `step` and then with each row index, so a new training step draws new samples and every row its
  own. plan: how the decode runs (DecodePlan; the same tokens under every plan but an int8 cache).
  Returns Rollouts with T = max_new_tokens.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}; it must be at least 1.")
  if len(stop_token_ids) > MAX_STOP_TOKENS:
    raise ValueError(f"{len(stop_token_ids)} stop tokens; at most {MAX_STOP_TOKENS} are supported.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p}; it must be in (0, 1].")
  prompt_tokens = np.asarray(prompt_tokens, np.int32)
  prompt_mask = np.asarray(prompt_mask, np.int32)
  b, p = prompt_tokens.shape
  bucket = prompt_bucket(p)
  if bucket > p:  # extra left padding: positions come from the mask, so outputs are unchanged
    prompt_tokens = np.pad(prompt_tokens, ((0, 0), (bucket - p, 0)), constant_values=pad_id)
    prompt_mask = np.pad(prompt_mask, ((0, 0), (bucket - p, 0)))
  if model.mesh is not None:
    sharding = named_sharding(model.mesh, ("batch", "length"), prompt_tokens.shape)
    prompt_tokens, prompt_mask = from_host(prompt_tokens, sharding), from_host(prompt_mask, sharding)
  program, settings = generate_program(group_size=group_size, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, top_k=top_k, stop_token_ids=stop_token_ids, pad_id=pad_id,
                                       plan=plan)
  graphdef, state = nnx.split(model)
  rollouts = program(graphdef, state, prompt_tokens, prompt_mask, jax.random.fold_in(key, step), *settings)
  trim = lambda x: x[:, :max_new_tokens]
  return rollouts.replace(tokens=trim(rollouts.tokens), logprobs=trim(rollouts.logprobs),
                          response_mask=trim(rollouts.response_mask))
