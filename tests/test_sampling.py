"""The grouped sampler against independent references: a teacher-forced full forward, NumPy filters, chi-square.

Every numeric check compares the jitted sampler (prefill + KV cache + while_loop) with something it does
not share code paths with: the model's cache-free forward over prompt + response, plain-loop NumPy
top-k / top-p, or the empirical distribution of many draws. Tiny float32 models (2 layers, width 128).
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from conftest import left_padded_batch, write_tiny_checkpoint

from mcpo_jax.mesh import make_mesh, named_sharding
from mcpo_jax.model import from_pretrained
from mcpo_jax.sampling import DecodePlan, compile_count, filter_logits, generate, generate_program

PAD_ID = 5  # a non-zero pad id, so "pad after the stop token" is not confused with token 0
BATCH, GROUP, PROMPT_LEN, MAX_NEW = 4, 2, 12, 8  # one shared shape so the greedy program compiles once
LOGPROB_TOL = 1e-5  # float32, max abs difference sampler vs teacher-forced log-probs
CHI2_P_FAIL = 1e-3  # a chi-square p-value below this fails a distribution test


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A tiny transformers Llama checkpoint (2 layers, width 128, vocab 256, llama3 rope scaling)."""
  directory = tmp_path_factory.mktemp("sampling_llama")
  write_tiny_checkpoint("llama", directory, seed=0)
  return directory


@pytest.fixture(scope="module")
def llama(llama_dir):
  """The tiny Llama without a mesh."""
  return from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def prompts():
  """[B, P] left-padded prompts of different real lengths (left padding 0, 3, 7, 0)."""
  ids, mask = left_padded_batch(np.random.default_rng(0), BATCH, PROMPT_LEN, 256)
  return ids.astype(np.int32), mask.astype(np.int32)


@pytest.fixture(scope="module")
def greedy_rollouts(llama, prompts):
  """Unconstrained greedy decoding of `prompts`, reused by several tests (one compile)."""
  ids, mask = prompts
  return generate(llama, ids, mask, group_size=GROUP, max_new_tokens=MAX_NEW, temperature=0.0,
                  key=jax.random.key(0), pad_id=PAD_ID)


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory):
  """A 2-layer, width-128 Llama with a 16-token vocabulary, so a few thousand draws resolve its distribution."""
  directory = tmp_path_factory.mktemp("vocab16")
  write_tiny_checkpoint("llama", directory, seed=1, vocab_size=16)
  return from_pretrained(directory)


# ---------------------------------------------------------------------------------------------- references


@jax.jit
def _forward(model, ids, mask):
  """The model's cache-free (teacher-forced) forward: logits [B, L, V]."""
  return model(ids, mask).logits


def teacher_forced_logits(model, prompt_tokens, prompt_mask, rollouts, group_size):
  """Logits [N, T, V] of the cache-free forward over prompt + response that predict each response token."""
  ids = np.concatenate([np.repeat(prompt_tokens, group_size, axis=0), np.asarray(rollouts.tokens)], axis=1)
  mask = np.concatenate([np.repeat(prompt_mask, group_size, axis=0), np.asarray(rollouts.response_mask)], axis=1)
  logits = np.asarray(_forward(model, ids, mask), np.float64)
  p, t = prompt_tokens.shape[1], rollouts.tokens.shape[1]
  return logits[:, p - 1:p - 1 + t]  # position p-1+i predicts response token i


def log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def softmax(x):
  return np.exp(log_softmax(x))


def reference_top_k(row, k):
  """Plain loop: keep every logit >= the k-th largest (ties kept)."""
  ordered = sorted(row.tolist(), reverse=True)
  kth = ordered[k - 1]
  return np.array([x if x >= kth else -np.inf for x in row.tolist()])


def reference_top_p(row, p):
  """Plain loop: the shortest descending prefix whose probability mass reaches p; keep logits >= its smallest."""
  ordered = sorted(row.tolist(), reverse=True)
  finite = [x for x in ordered if x != -np.inf]
  top = finite[0]
  weights = [math.exp(x - top) if x != -np.inf else 0.0 for x in ordered]
  total = sum(weights)
  mass, threshold = 0.0, ordered[-1]
  for x, w in zip(ordered, weights):
    mass += w / total
    if mass >= p:
      threshold = x
      break
  return np.array([x if x >= threshold else -np.inf for x in row.tolist()])


def chi_square_p_value(counts, probs):
  """Pearson's chi-square goodness-of-fit p-value (scipy if installed, else Wilson-Hilferty normal approx)."""
  counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
  expected = counts.sum() * probs / probs.sum()
  assert expected.min() >= 5, f"expected counts {expected} too small for a chi-square test"
  stat, df = float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1
  try:
    import scipy.stats
    return float(scipy.stats.chi2.sf(stat, df)), stat
  except ImportError:
    # Wilson-Hilferty: (stat/df)^(1/3) is ~normal(1 - 2/(9df), 2/(9df)); its tail gives the p-value.
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2)), stat


# ---------------------------------------------------------------------------------------------- teacher forcing


def test_greedy_matches_teacher_forced_argmax_and_logprobs(llama, prompts, greedy_rollouts):
  """Greedy token = argmax of the full forward at every position; log-prob = log_softmax(logits) (T=1 for greedy)
  at that token, |diff| <= 1e-5."""
  ids, mask = prompts
  r = greedy_rollouts
  n = BATCH * GROUP
  assert r.tokens.shape == r.logprobs.shape == r.response_mask.shape == (n, MAX_NEW)
  assert r.tokens.dtype == jnp.int32 and r.logprobs.dtype == jnp.float32
  np.testing.assert_array_equal(r.response_mask, 1)  # no stop tokens: every row runs to the cap
  np.testing.assert_array_equal(r.lengths, MAX_NEW)
  np.testing.assert_array_equal(r.truncated, True)
  tokens = np.asarray(r.tokens)
  for b in range(BATCH):  # greedy rows of one prompt are identical
    group = tokens[b * GROUP:(b + 1) * GROUP]
    np.testing.assert_array_equal(group, np.broadcast_to(group[0], group.shape))
  # The rows keep their own prompt (rows of prompt b are consecutive); extra bucket padding is on the left.
  np.testing.assert_array_equal(np.asarray(r.prompt_tokens)[:, -PROMPT_LEN:] * np.asarray(r.prompt_mask)[:, -PROMPT_LEN:],
                                np.repeat(ids * mask, GROUP, axis=0))

  logits = teacher_forced_logits(llama, ids, mask, r, GROUP)
  np.testing.assert_array_equal(tokens, logits.argmax(axis=-1))
  want = np.take_along_axis(log_softmax(logits), tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(r.logprobs), want, atol=LOGPROB_TOL, rtol=0)


@pytest.fixture(scope="module")
def sampled_rollouts(llama, prompts):
  """T=0.7 sampled rollouts with G=8 rows per prompt; the same shapes serve the RNG tests (one compile)."""
  ids, mask = prompts
  return generate(llama, ids, mask, group_size=8, max_new_tokens=MAX_NEW, temperature=0.7, key=jax.random.key(1),
                  step=3, pad_id=PAD_ID)


def test_sampled_logprobs_match_teacher_forced(llama, prompts, sampled_rollouts):
  """For T=0.7 draws, log-prob of each drawn token = teacher-forced log_softmax(logits / 0.7) there, <= 1e-5."""
  ids, mask = prompts
  r = sampled_rollouts
  tokens = np.asarray(r.tokens)
  logits = teacher_forced_logits(llama, ids, mask, r, 8)
  want = np.take_along_axis(log_softmax(logits / 0.7), tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_array_equal(r.response_mask, 1)
  np.testing.assert_allclose(np.asarray(r.logprobs), want, atol=LOGPROB_TOL, rtol=0)
  # Not vacuous: sampling really left the argmax path somewhere.
  assert (tokens != logits.argmax(axis=-1)).any()


# ---------------------------------------------------------------------------------------------- left padding


def test_left_padding_does_not_change_greedy_output(llama, prompts, greedy_rollouts):
  """The same prompts with 0, 4, 10 and 20 extra left pads (widths 12, 16 -> prompt bucket 16; 22 -> 24;
  32 -> 32) decode to identical tokens; log-probs agree to 1e-5."""
  ids, mask = prompts
  outputs = [greedy_rollouts]
  for extra in (4, 10, 20):
    padded_ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=PAD_ID + 1)  # junk ids under mask 0
    padded_mask = np.pad(mask, ((0, 0), (extra, 0)))
    outputs.append(generate(llama, padded_ids, padded_mask, group_size=GROUP, max_new_tokens=MAX_NEW,
                            temperature=0.0, key=jax.random.key(0), pad_id=PAD_ID))
  assert [o.prompt_tokens.shape[1] for o in outputs] == [16, 16, 24, 32]  # crosses two bucket boundaries
  for other in outputs[1:]:
    np.testing.assert_array_equal(other.tokens, outputs[0].tokens)
    np.testing.assert_allclose(other.logprobs, outputs[0].logprobs, atol=LOGPROB_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------- stop tokens


def _choose_stop_tokens(tokens):
  """Two tokens greedy decoding really produces: one that a row first emits at its last allowed step (so
  it stops exactly at the cap), one that stops another row earlier; at least one row must hit neither."""
  stops = []
  for row in range(len(tokens)):  # a row's last token that it did not emit before, absent from some row
    last = tokens[row, -1]
    if last not in tokens[row, :-1] and not np.isin(tokens, [last]).any(axis=1).all():
      stops = [int(last)]
      break
  for candidate in sorted(set(tokens.ravel().tolist()) - set(stops)):
    hit = np.isin(tokens, stops + [candidate]).any(axis=1)
    if not hit.all() and (np.isin(tokens[:, :-1], [candidate]).any(axis=1) & ~np.isin(tokens, stops).any(axis=1)).any():
      return stops + [candidate]
  return stops


def test_stop_tokens_end_their_rows(llama, prompts, greedy_rollouts):
  """A row ends at its first stop token (mask 1 through it, pad id and mask 0 after, log-prob 0 after);
  `truncated` is True exactly for rows that reach max_new_tokens without one (a stop on the last allowed
  token is not truncated). Expectations come from the unconstrained greedy run of the same prompts."""
  ids, mask = prompts
  free = np.asarray(greedy_rollouts.tokens)
  stops = _choose_stop_tokens(free)
  r = generate(llama, ids, mask, group_size=GROUP, max_new_tokens=MAX_NEW, temperature=0.0, key=jax.random.key(0),
               stop_token_ids=stops, pad_id=PAD_ID)

  want_tokens = np.full_like(free, PAD_ID)
  want_mask = np.zeros_like(free)
  want_truncated = np.zeros(len(free), bool)
  for row in range(len(free)):
    hits = np.flatnonzero(np.isin(free[row], stops))
    end = hits[0] + 1 if len(hits) else MAX_NEW
    want_tokens[row, :end] = free[row, :end]
    want_mask[row, :end] = 1
    want_truncated[row] = not len(hits)
  lengths = want_mask.sum(axis=1)
  # Not vacuous: rows that stop early, rows that stop on the last allowed token, rows that are truncated.
  assert (lengths < MAX_NEW).any(), (stops, free)
  assert ((lengths == MAX_NEW) & ~want_truncated).any(), (stops, free)
  assert want_truncated.any(), (stops, free)

  np.testing.assert_array_equal(r.tokens, want_tokens)
  np.testing.assert_array_equal(r.response_mask, want_mask)
  np.testing.assert_array_equal(r.lengths, lengths)
  np.testing.assert_array_equal(r.lengths, np.asarray(r.response_mask).sum(axis=1))
  np.testing.assert_array_equal(r.truncated, want_truncated)
  free_logprobs = np.asarray(greedy_rollouts.logprobs)
  np.testing.assert_allclose(np.asarray(r.logprobs), np.where(want_mask == 1, free_logprobs, 0.0),
                             atol=LOGPROB_TOL, rtol=0)


def test_all_rows_stopping_ends_the_loop_early(llama, prompts, greedy_rollouts):
  """Every row's first greedy token is a stop token: all rows have length 1, none is truncated, and the
  remaining columns are pad id / mask 0 / log-prob 0 (the while_loop's early exit leaves them untouched)."""
  ids, mask = prompts
  free = np.asarray(greedy_rollouts.tokens)
  stops = sorted(set(free[:, 0].tolist()))
  r = generate(llama, ids, mask, group_size=GROUP, max_new_tokens=MAX_NEW, temperature=0.0, key=jax.random.key(0),
               stop_token_ids=stops, pad_id=PAD_ID)
  np.testing.assert_array_equal(r.lengths, 1)
  np.testing.assert_array_equal(r.truncated, False)
  np.testing.assert_array_equal(np.asarray(r.tokens)[:, 0], free[:, 0])
  np.testing.assert_array_equal(np.asarray(r.tokens)[:, 1:], PAD_ID)
  np.testing.assert_array_equal(np.asarray(r.response_mask)[:, 1:], 0)
  np.testing.assert_array_equal(np.asarray(r.logprobs)[:, 1:], 0.0)
  np.testing.assert_allclose(np.asarray(r.logprobs)[:, 0], np.asarray(greedy_rollouts.logprobs)[:, 0],
                             atol=LOGPROB_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------- filters


def test_top_k_1_sampling_equals_greedy(llama, prompts, greedy_rollouts):
  """top_k=1 at T=1 must draw the argmax every time; log-probs stay log_softmax(logits) (<= 1e-5)."""
  ids, mask = prompts
  r = generate(llama, ids, mask, group_size=GROUP, max_new_tokens=MAX_NEW, temperature=1.0, top_k=1,
               key=jax.random.key(7), pad_id=PAD_ID)
  np.testing.assert_array_equal(r.tokens, greedy_rollouts.tokens)
  np.testing.assert_allclose(r.logprobs, greedy_rollouts.logprobs, atol=LOGPROB_TOL, rtol=0)


def _random_logits(seed, rows=12, vocab=40):
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.standard_normal((rows, vocab))).astype(np.float32)
  logits[0] = np.round(logits[0])  # many exact ties, to exercise the "ties are kept" rule
  logits[1, :] = 0.5  # a flat row: everything is tied
  return logits


@pytest.mark.parametrize("k", [1, 2, 5, 17, 40])
def test_filter_top_k_matches_numpy_loops(k):
  """filter_logits(top_k=k) keeps exactly the logits >= the k-th largest (exact equality, -inf elsewhere)."""
  logits = _random_logits(k)
  got = np.asarray(filter_logits(jnp.asarray(logits), k, None))
  want = np.stack([reference_top_k(row, k) for row in logits])
  np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_filter_top_p_matches_numpy_loops(p):
  """filter_logits(top_p=p) keeps the shortest descending prefix reaching mass p (plus ties), exactly."""
  logits = _random_logits(int(p * 1000))
  got = np.asarray(filter_logits(jnp.asarray(logits), 0, jnp.float32(p)))
  want = np.stack([reference_top_p(row, p) for row in logits])
  np.testing.assert_array_equal(got, want.astype(np.float32))
  assert (np.isinf(got).sum(axis=1) > 0).any() or p > 0.99  # not vacuous for the smaller p


@pytest.mark.parametrize("k,p", [(5, 0.5), (10, 0.9), (3, 0.99)])
def test_filter_top_k_then_top_p_matches_numpy_loops(k, p):
  """Both set: top-p acts on the top-k survivors renormalised (top-k first, as transformers does)."""
  logits = _random_logits(k + 100)
  got = np.asarray(filter_logits(jnp.asarray(logits), k, jnp.float32(p)))
  want = np.stack([reference_top_p(reference_top_k(row, k), p) for row in logits])
  np.testing.assert_array_equal(got, want.astype(np.float32))


# ---------------------------------------------------------------------------------------------- distributions


DRAWS = 4000  # one prompt, 4000 rows, one token each: each row has its own key


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8)],
                         ids=["T=1", "T=0.7", "top_k=5", "top_p=0.8"])
def test_first_token_distribution_matches_softmax(tiny_vocab_model, temperature, top_k, top_p):
  """4000 one-token draws follow softmax(last prompt logits / T) (after the NumPy top-k / top-p filter,
  renormalised): no draw outside the kept set, and a chi-square p-value >= 1e-3 over it."""
  prompt = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
  logits = np.asarray(_forward(tiny_vocab_model, prompt, np.ones_like(prompt)), np.float64)[0, -1]  # [V]
  filtered = logits / temperature
  if top_k:
    filtered = reference_top_k(filtered, top_k)
  if top_p < 1.0:
    filtered = reference_top_p(filtered, top_p)
  kept = np.isfinite(filtered)
  assert kept.sum() > 1 and (kept.all() == (top_k == 0 and top_p == 1.0))  # the filters really filter

  r = generate(tiny_vocab_model, prompt, np.ones_like(prompt), group_size=DRAWS, max_new_tokens=1,
               temperature=temperature,
               top_k=top_k, top_p=top_p, key=jax.random.key(42), pad_id=0)
  tokens = np.asarray(r.tokens)[:, 0]
  counts = np.bincount(tokens, minlength=len(logits))
  assert counts[~kept].sum() == 0, f"draws outside the kept set: {counts}, kept {kept}"
  p_value, stat = chi_square_p_value(counts[kept], softmax(filtered[kept]))
  assert p_value >= CHI2_P_FAIL, f"chi2={stat:.1f} p={p_value:.2e} counts={counts} probs={softmax(filtered)}"
  # The log-probs are of the unfiltered tempered distribution (what the trainer recomputes).
  np.testing.assert_allclose(np.asarray(r.logprobs)[:, 0], log_softmax(logits / temperature)[tokens],
                             atol=LOGPROB_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------- RNG


def test_rng_same_key_same_samples_new_step_new_samples(llama, prompts, sampled_rollouts):
  """Same key and step -> identical samples; another step or key -> different; rows of one prompt differ."""
  ids, mask = prompts
  kwargs = dict(group_size=8, max_new_tokens=MAX_NEW, temperature=0.7, pad_id=PAD_ID)
  again = generate(llama, ids, mask, key=jax.random.key(1), step=3, **kwargs)
  np.testing.assert_array_equal(again.tokens, sampled_rollouts.tokens)
  np.testing.assert_array_equal(again.logprobs, sampled_rollouts.logprobs)
  for other in (generate(llama, ids, mask, key=jax.random.key(1), step=4, **kwargs),
                generate(llama, ids, mask, key=jax.random.key(2), step=3, **kwargs)):
    assert (np.asarray(other.tokens) != np.asarray(sampled_rollouts.tokens)).mean() > 0.3


def test_rows_of_one_prompt_differ(llama, prompts):
  """group_size=8 at T=1: the 8 rows of each prompt are 8 distinct responses."""
  ids, mask = prompts
  r = generate(llama, ids, mask, group_size=8, max_new_tokens=MAX_NEW, temperature=1.0, key=jax.random.key(3),
               pad_id=PAD_ID)
  tokens = np.asarray(r.tokens).reshape(BATCH, 8, MAX_NEW)
  for b in range(BATCH):
    assert len({tuple(row) for row in tokens[b].tolist()}) == 8, tokens[b]
    assert (tokens[b, :, 0] != tokens[b, 0, 0]).any()  # the very first token already varies across rows


# ---------------------------------------------------------------------------------------------- meshes


def test_meshes_give_identical_greedy_rollouts(llama_dir, prompts, greedy_rollouts):
  """1-device, 2x4 (fsdp x tensor) and 8x1 (fsdp) meshes: identical greedy tokens, log-probs within 1e-5,
  and the same as the unsharded model."""
  ids, mask = prompts
  results = {}
  for name, shape in {"1 device": (1, 1, 1), "2x4": (1, 2, 4), "8x1": (1, 8, 1)}.items():
    mesh = make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
    model = from_pretrained(llama_dir, mesh=mesh)
    results[name] = generate(model, ids, mask, group_size=GROUP, max_new_tokens=MAX_NEW, temperature=0.0,
                             key=jax.random.key(0), pad_id=PAD_ID)
  for name, r in results.items():
    np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(greedy_rollouts.tokens), err_msg=name)
    np.testing.assert_allclose(np.asarray(r.logprobs), np.asarray(greedy_rollouts.logprobs), atol=LOGPROB_TOL,
                               rtol=0, err_msg=name)
    np.testing.assert_array_equal(np.asarray(r.response_mask), np.asarray(greedy_rollouts.response_mask))


# ---------------------------------------------------------------------------------------------- compiles


def test_compile_count_reuses_programs(llama, prompts):
  """Same shapes, another max_new_tokens in the same power-of-two bucket, another prompt width in the same
  bucket, key or step: no new program. A new length bucket: exactly one (so the counter really counts)."""
  ids, mask = prompts
  greedy = dict(group_size=GROUP, temperature=0.0, pad_id=PAD_ID)
  generate(llama, ids, mask, max_new_tokens=MAX_NEW, key=jax.random.key(0), **greedy)  # bucket 8
  before = compile_count()
  generate(llama, ids, mask, max_new_tokens=MAX_NEW, key=jax.random.key(0), **greedy)
  assert compile_count() == before, "the same call recompiled"
  r = generate(llama, ids, mask, max_new_tokens=5, key=jax.random.key(5), step=2, **greedy)
  assert r.tokens.shape == (BATCH * GROUP, 5)
  assert compile_count() == before, "max_new_tokens 8 -> 5 (same bucket 8), or a new key/step, recompiled"
  generate(llama, ids[:, 2:], mask[:, 2:], max_new_tokens=MAX_NEW, key=jax.random.key(0), **greedy)
  assert compile_count() == before, "prompt width 12 -> 10 (same prompt bucket 16) recompiled"
  generate(llama, ids, mask, max_new_tokens=MAX_NEW + 3, key=jax.random.key(0), **greedy)  # bucket 16
  assert compile_count() == before + 1, "a new length bucket should build exactly one program"


def _loop_body_lines(hlo_text: str) -> list[str]:
  """The instructions of the compiled program's while-loop bodies (with what they call)."""
  bodies, computations, name = set(), {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(1)
      computations[name] = []
    elif name is not None:
      computations[name].append(line)
      bodies.update(re.findall(r"body=%?([\w.\-]+)", line))
  seen, todo, lines = set(), list(bodies), []
  while todo:
    current = todo.pop()
    if current in seen or current not in computations:
      continue
    seen.add(current)
    lines += computations[current]
    for line in computations[current]:
      todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line)
  return lines


def _loop_body_ops(hlo_text: str, op: str) -> int:
  """How many `op` instructions the compiled program's while-loop bodies run."""
  return sum(bool(re.search(rf"= \S+ {op}(-start)?\(", line)) for line in _loop_body_lines(hlo_text))


def test_gathered_weights_decode_the_same_without_per_token_weight_gathers(llama_dir, prompts, greedy_rollouts):
  """rollout.gather_weights on an 8-way FSDP mesh: the same greedy tokens (log-probs within 1e-5) as the
  unsharded model, and the compiled decode loop no longer all-gathers weights at every token (it does
  without the option: the count the option removes)."""
  ids, mask = prompts
  mesh = make_mesh(1, 8, 1)
  model = from_pretrained(llama_dir, mesh=mesh)
  gathers = {}
  for gather in (False, True):
    out = generate(model, ids, mask, group_size=GROUP, max_new_tokens=MAX_NEW, temperature=0.0,
                   key=jax.random.key(0), pad_id=PAD_ID, plan=DecodePlan(gather_weights=gather))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy_rollouts.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(greedy_rollouts.logprobs), atol=LOGPROB_TOL,
                               rtol=0)
    program, settings = generate_program(group_size=GROUP, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0,
                                         top_k=0, stop_token_ids=(), pad_id=PAD_ID,
                                         plan=DecodePlan(gather_weights=gather))
    graphdef, state = nnx.split(model)
    sharded = jax.device_put(ids, named_sharding(mesh, ("batch", "length"), ids.shape))
    hlo = program.lower(graphdef, state, sharded, sharded, jax.random.key(0), *settings).compile().as_text()
    gathers[gather] = _loop_body_ops(hlo, "all-gather")
  assert gathers[False] >= 1 and gathers[True] == 0, gathers  # XLA combines the layers' weight gathers into few ops


def _loop_body_gather_sizes(hlo_text: str) -> list[int]:
  """The element counts of what the while-loop bodies' all-gathers produce."""
  gathers = [line for line in _loop_body_lines(hlo_text) if re.search(r"= \S+ all-gather(-start)?\(", line)]
  return [math.prod(int(d) for d in dims.split(",") if d)
          for line in gathers for dims in re.findall(r"\w+\[([\d,]*)\]", line.split(" all-gather")[0])]


def test_mlp_over_fsdp_decodes_the_same_moving_rows_not_weights(tmp_path, prompts):
  """rollout.mlp_over_fsdp on a data 2 × fsdp 2 × tensor 2 mesh: the same greedy tokens (log-probs within
  1e-5) as the unsharded model. The decode loop's MLP matmuls use weight shards of F/4 columns (fsdp × tensor),
  never the F/2 of a tensor-only split (which XLA could gather once, outside the loop), and what the loop
  all-gathers are rows (at most N × max(hidden, vocab) elements), never a weight. F = 384 is a width no
  other weight has, so the shapes name the MLP."""
  write_tiny_checkpoint("llama", tmp_path, intermediate_size=384)
  ids, mask = prompts
  settings = dict(group_size=GROUP, max_new_tokens=MAX_NEW, temperature=0.0, key=jax.random.key(0), pad_id=PAD_ID)
  reference = generate(from_pretrained(tmp_path), ids, mask, **settings)
  mesh = make_mesh(2, 2, 2)
  model = from_pretrained(tmp_path, mesh=mesh)
  split_mlp = DecodePlan(gather_weights=True, mlp_over_fsdp=True)
  out = generate(model, ids, mask, plan=split_mlp, **settings)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(reference.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(reference.logprobs), atol=LOGPROB_TOL, rtol=0)

  graphdef, state = nnx.split(model)
  program, constants = generate_program(group_size=GROUP, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0,
                                        top_k=0, stop_token_ids=(), pad_id=PAD_ID, plan=split_mlp)
  sharded = jax.device_put(ids, named_sharding(mesh, ("batch", "length"), ids.shape))
  hlo = program.lower(graphdef, state, sharded, sharded, jax.random.key(0), *constants).compile().as_text()
  body = "\n".join(_loop_body_lines(hlo))
  e, f = model.config.hidden_size, model.config.intermediate_size
  split, tensor_only = (f"[{e},{f // 4}]", f"[{f // 4},{e}]"), (f"[{e},{f // 2}]", f"[{f // 2},{e}]")
  assert all(shape in body for shape in split), "the loop does not multiply by the fsdp × tensor MLP shards"
  assert not any(shape in body for shape in tensor_only), "the loop multiplies by tensor-only MLP weights"
  assert max(_loop_body_gather_sizes(hlo)) <= BATCH * GROUP * max(e, model.config.vocab_size)
  with pytest.raises(ValueError, match="needs gather_weights"):
    DecodePlan(mlp_over_fsdp=True)


@pytest.mark.parametrize("segments", [3, MAX_NEW])
def test_decode_segments_sample_the_same_rows_over_fewer_cache_slots(llama, prompts, sampled_rollouts, segments):
  """rollout.decode_segments: the same T=0.7 draws and log-probs (within 1e-5) as one decode loop, with
  `segments` loops in the program, each attending over only the slots filled by its end (3 does not divide
  the 8 steps; 8 is one loop per token). A row that stops mid-segment stays stopped in the next."""
  ids, mask = prompts
  out = generate(llama, ids, mask, group_size=8, max_new_tokens=MAX_NEW, temperature=0.7, key=jax.random.key(1),
                 step=3, pad_id=PAD_ID, plan=DecodePlan(segments=segments))
  for field in ("tokens", "response_mask", "lengths", "truncated"):
    np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(sampled_rollouts, field)))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(sampled_rollouts.logprobs), atol=LOGPROB_TOL, rtol=0)
  stops = _choose_stop_tokens(np.asarray(sampled_rollouts.tokens))
  stopped = [generate(llama, ids, mask, group_size=8, max_new_tokens=MAX_NEW, temperature=0.7, key=jax.random.key(1),
                      step=3, pad_id=PAD_ID, stop_token_ids=stops, plan=DecodePlan(segments=n))
             for n in (1, segments)]
  np.testing.assert_array_equal(np.asarray(stopped[1].tokens), np.asarray(stopped[0].tokens))
  assert (np.asarray(stopped[0].lengths) < MAX_NEW).any()  # not vacuous: some rows stop early

  program, settings = generate_program(group_size=8, max_new_tokens=MAX_NEW, temperature=0.7, top_p=1.0, top_k=0,
                                       stop_token_ids=(), pad_id=PAD_ID,
                                       plan=DecodePlan(segments=segments))
  graphdef, state = nnx.split(llama)
  jaxpr = jax.make_jaxpr(lambda *args: program(graphdef, *args))(state, ids, mask, jax.random.key(0), *settings)
  loops = [eqn for eqn in jaxpr.jaxpr.eqns[0].params["jaxpr"].jaxpr.eqns if eqn.primitive.name == "while"]
  assert len(loops) == segments
  # Each loop's attention reads the prompt's slots (held once per prompt) and the response slots filled by its end.
  ends, prompt = [-(-MAX_NEW * j // segments) for j in range(1, segments + 1)], ids.shape[1]  # unbucketed here
  for loop, end in zip(loops, ends):
    shapes = lambda rank: {v.aval.shape for eqn in _eqns(loop.params["body_jaxpr"].jaxpr)
                           if eqn.primitive.name == "dot_general" for v in eqn.outvars if len(v.aval.shape) == rank}
    widths = {shape[-1] for shape in shapes(4)}
    assert end in widths, (end, widths)  # a row's scores [N, K, G·T, S] over its visible response slots
    assert MAX_NEW not in widths or end == MAX_NEW, (end, widths)
    assert any(prompt in shape for shape in shapes(5)), shapes(5)  # a prompt's rows' scores over its P keys


def _eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _eqns(inner if hasattr(inner, "eqns") else inner.jaxpr)
