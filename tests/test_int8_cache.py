"""rollout.kv_cache="int8": the quantizer against NumPy, attention over an int8 cache against a float64 dense reference
on the dequantized keys, a model decoding from it against the exact forward, and the RL loop recomputing π_old."""

import ast

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from conftest import left_padded_batch

from mcpo_jax import rl_loop
from mcpo_jax.batch import TrainBatch
from mcpo_jax.config import ConfigError, build, defaults
from mcpo_jax.mesh import make_mesh, to_host
from mcpo_jax.metrics import read_metrics
from mcpo_jax.model import from_pretrained
from mcpo_jax.model.attention import cached_attention, grouped_cached_attention, quantize_int8
from mcpo_jax.sampling import DecodePlan, generate
from mcpo_jax.train import sequence_logprobs

TOL = 1e-5  # float32 against float64, max abs; outputs are O(1)


def _numpy_int8(x: np.ndarray):
  """The reference quantizer: per vector, scale = max |x| / 127 and steps = x / scale rounded to nearest."""
  scale = np.abs(x).max(axis=-1) / 127.0
  steps = np.rint(x / np.where(scale > 0, scale, 1.0)[..., None])
  return steps.astype(np.int8), scale


def _dense(q, k, v, key_mask, first_slot):
  """Softmax(q kᵀ / √d) v in float64 with causal and key masks; query i sits at slot first_slot + i.
  q: [B, K, G, T, D]; k, v: [B, K, S, D]; key_mask: [B, S]."""
  q, k, v = (torch.tensor(x, dtype=torch.float64) for x in (q, k, v))
  t, s = q.shape[3], k.shape[2]
  allowed = torch.tril(torch.ones(t, s, dtype=torch.bool), diagonal=first_slot)[None] & torch.tensor(key_mask)[:, None]
  scores = torch.einsum("bkgtd,bksd->bkgts", q, k) / q.shape[-1] ** 0.5
  scores = scores.masked_fill(~allowed[:, None, None], torch.finfo(torch.float64).min)
  return torch.einsum("bkgts,bksd->bkgtd", torch.softmax(scores, dim=-1), v).numpy()


def test_quantize_int8_matches_numpy_and_is_within_half_a_step():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 2, 9, 16)).astype(np.float32) * rng.uniform(0.01, 30, (3, 2, 9, 1)).astype(np.float32)
  x[1, 0, 4] = 0.0  # a vector of zeros: scale 0, steps 0
  steps, scale = quantize_int8(jnp.asarray(x))
  want_steps, want_scale = _numpy_int8(x)
  assert steps.dtype == jnp.int8 and scale.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=1e-6)
  # The two divisions may round a value that sits on .5 differently in float32: at most one step apart, rarely.
  differ = np.asarray(steps) != want_steps
  assert np.abs(np.asarray(steps, np.int32) - want_steps).max() <= 1 and differ.mean() < 1e-3
  error = np.abs(np.asarray(steps, np.float32) * np.asarray(scale)[..., None] - x)
  assert np.all(error <= np.asarray(scale)[..., None] * (0.5 + 1e-5) + 1e-7)
  assert np.all(np.asarray(steps)[1, 0, 4] == 0) and float(scale[1, 0, 4]) == 0.0


def test_attention_over_an_int8_cache_is_dense_attention_over_its_dequantized_keys():
  """cached_attention and grouped_cached_attention with scales equal float64 dense attention whose keys and values
  are the cache's steps times their scales (1e-5), and stay within 2% of the values' range of attention over the
  unquantized ones."""
  rng = np.random.default_rng(1)
  b, rows, kv, g, t, d, p, s = 2, 3, 2, 3, 4, 16, 5, 11  # 2 prompts × 3 rows; T queries at own slots 7..10
  n, first = b * rows, 7
  q = rng.standard_normal((n, kv, g, t, d)).astype(np.float32)
  k, v = (rng.standard_normal((n, kv, s, d)).astype(np.float32) * 3 for _ in range(2))
  prompt_k, prompt_v = (rng.standard_normal((b, kv, p, d)).astype(np.float32) for _ in range(2))
  prompt_mask = np.ones((b, p), bool)
  prompt_mask[1, :2] = False  # a left-padded prompt
  key_mask = np.ones((n, s), bool)
  key_mask[2, 3] = key_mask[5, 0] = False
  (k8, k_scale), (v8, v_scale) = _numpy_int8(k), _numpy_int8(v)
  k_deq, v_deq = k8 * k_scale[..., None], v8 * v_scale[..., None]
  slots = first + jnp.arange(t)
  steps = lambda x: jnp.asarray(x, jnp.float32)  # the int8 steps in the compute dtype, as the model passes them

  got = cached_attention(jnp.asarray(q), steps(k8), steps(v8), slots, jnp.asarray(key_mask), jnp.asarray(k_scale),
                         jnp.asarray(v_scale))
  np.testing.assert_allclose(np.asarray(got), _dense(q, k_deq, v_deq, key_mask, first), atol=TOL, rtol=0)
  exact = cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), slots, jnp.asarray(key_mask))
  assert 0 < np.abs(np.asarray(got) - np.asarray(exact)).max() < 0.02 * np.abs(v).max()

  got = grouped_cached_attention(jnp.asarray(q), jnp.asarray(prompt_k), jnp.asarray(prompt_v),
                                 jnp.asarray(prompt_mask), steps(k8), steps(v8), slots, jnp.asarray(key_mask),
                                 jnp.asarray(k_scale), jnp.asarray(v_scale))
  by_row = lambda x: np.repeat(x, rows, axis=0)  # each row sees its prompt, then its own slots
  want = _dense(q, np.concatenate([by_row(prompt_k), k_deq], axis=2), np.concatenate([by_row(prompt_v), v_deq], axis=2),
                np.concatenate([by_row(prompt_mask), key_mask], axis=1), p + first)
  np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_a_model_decoding_from_an_int8_cache_stays_near_the_full_forward(tiny_checkpoints):
  """2 prompts × 3 rows decoded against their prompt's keys and an int8 cache of their own slots: every logit is
  within 0.05 of the full forward's (logits span about ±1 here; the float cache's gap is 1e-5, test_model) and the
  cache really holds int8."""
  directory, hf_model = tiny_checkpoints["qwen2"]
  model = from_pretrained(directory, mesh=make_mesh(1, 2, 4))
  rng, rows, prompt_len, new = np.random.default_rng(4), 3, 7, 6
  prompt_ids, prompt_mask = left_padded_batch(rng, 2, prompt_len, hf_model.config.vocab_size)
  own = rng.integers(0, hf_model.config.vocab_size, (2 * rows, new))
  ids = np.concatenate([np.repeat(prompt_ids, rows, axis=0), own], axis=1)
  mask = np.concatenate([np.repeat(prompt_mask, rows, axis=0), np.ones_like(own)], axis=1)
  full = np.asarray(model(ids, mask).logits)  # [N, P + T, V]
  prompt = model(prompt_ids, prompt_mask, return_logits=False, return_kv=True).cache
  decode = jax.jit(lambda m, token, c, p: m(token, jnp.ones_like(token), cache=c, prefix=p))
  cache = model.init_cache(2 * rows, 8, jnp.int8)
  gaps = []
  for t in range(new - 1):
    out = decode(model, own[:, t:t + 1], cache, prompt)
    cache = out.cache
    gaps.append(np.abs(np.asarray(out.logits[:, 0]) - full[:, prompt_len + t]).max())
  assert cache.layers[0].keys.dtype == jnp.int8 and cache.layers[0].key_scales.shape == (2 * rows, model.config.num_kv_heads, 8)
  assert 1e-5 < max(gaps) < 0.05, gaps


def test_the_int8_sampler_samples_near_the_policy_and_exact_restores_the_float_cache(tiny_checkpoints):
  """Greedy rows from the int8 cache: their log-probs are within 0.05 of the teacher-forced pass's on the same
  tokens; DecodePlan.exact() (what evaluation decodes with) samples what the plain plan samples."""
  directory, hf_model = tiny_checkpoints["qwen3"]
  model = from_pretrained(directory, mesh=make_mesh(1, 8, 1))
  prompt, mask = left_padded_batch(np.random.default_rng(2), 4, 9, hf_model.config.vocab_size)
  sample = lambda plan: generate(model, prompt, mask, group_size=2, max_new_tokens=12, temperature=0.7, top_k=1,
                                 key=jax.random.key(0), plan=plan)
  int8, exact, plain = sample(DecodePlan(int8_cache=True)), sample(DecodePlan(int8_cache=True).exact()), sample(
      DecodePlan())
  np.testing.assert_array_equal(to_host(exact.tokens), to_host(plain.tokens))
  graphdef, params = nnx.split(model)
  zeros = np.zeros(8, np.float32)
  batch = TrainBatch(prompt_tokens=int8.prompt_tokens, prompt_mask=int8.prompt_mask, tokens=int8.tokens,
                     mask=int8.response_mask, old_logp=int8.logprobs, ref_logp=int8.logprobs, rewards=zeros,
                     correct=zeros.astype(np.int32), advantages=zeros, group_ids=zeros.astype(np.int32),
                     domain_ids=zeros.astype(np.int32))
  forced = to_host(sequence_logprobs(graphdef, params, batch, temperature=0.7))
  gap = np.abs(forced - to_host(int8.logprobs)) * to_host(int8.response_mask)
  assert 0 < gap.max() < 0.05, gap.max()


def test_an_int8_cache_without_recomputed_old_logprobs_is_one_clear_error():
  config = defaults()
  config.rollout.kv_cache = "int8"
  with pytest.raises(ConfigError, match="kv_cache='int8' samples from an approximation of the policy.*"
                                        "--config.train.recompute_old_logp=true"):
    build(config)


def test_the_update_trains_on_old_logprobs_recomputed_by_the_teacher_forced_pass(learnable_task, tmp_path, monkeypatch):
  """A 2-step GRPO run sampling from an int8 cache: every trained batch's old_logp is the policy's teacher-forced
  log-probs of its rows under the parameters before the update (sequence_logprobs, itself tested against
  transformers), not the sampler's; the gap between the two is logged (sampling/logp_gap > 0)."""
  from configs.multi_domain import get_config
  model_dir, domains = learnable_task
  config = get_config("tiny")
  config.model.name = str(model_dir)
  config.data.domains = ast.literal_eval(domains)
  config.rollout.kv_cache, config.train.recompute_old_logp = "int8", True
  config.rewards.processes, config.algorithm, config.objective.kl_coef = 0, "grpo", 0.0
  config.eval.at_start = config.eval.at_end = False
  config.train.steps, config.diag_every, config.checkpoint.every = 2, 0, 0
  config.workdir = str(tmp_path)
  run = build(config)
  update, checked = rl_loop.update_policy, []

  def checking_update(state, batch, *args, **kwargs):
    checked.append((jax.tree.map(np.asarray, state.params["lm"]), jax.tree.map(to_host, batch)))
    return update(state, batch, *args, **kwargs)

  graphdefs = []
  jit_sequence_logprobs = rl_loop.jit_sequence_logprobs

  def recording_jit(graphdef, *args):
    graphdefs.append(graphdef)
    return jit_sequence_logprobs(graphdef, *args)

  monkeypatch.setattr(rl_loop, "update_policy", checking_update)
  monkeypatch.setattr(rl_loop, "jit_sequence_logprobs", recording_jit)
  rl_loop.train(run)
  assert len(checked) == 2
  for params, batch in checked:
    want = to_host(jit_sequence_logprobs(graphdefs[-1], run.update, run.train.minibatches)(params, batch))
    np.testing.assert_allclose(batch.old_logp * batch.mask, want * batch.mask, atol=1e-6)
    assert np.abs((batch.old_logp - batch.ref_logp) * batch.mask).max() > 0  # ref_logp: the sampler's (kl_coef 0)
  gaps = [read_metrics(tmp_path)[step]["sampling/logp_gap"] for step in (1, 2)]
  assert all(0 < gap < 0.05 for gap in gaps), gaps
