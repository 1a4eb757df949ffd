"""DAPO's dynamic sampling: which groups a step keeps (against a plain-loop reference), the merged rollouts'
padding, and a tiny in-process run whose fake verifier makes some groups all-correct, some all-wrong and some
mixed: only the mixed ones are trained on, and the counts logged are those the sampled rewards imply."""

import ast

import numpy as np
import pytest

from mcpo_jax import rl_loop
from mcpo_jax.dynamic_sampling import choose_groups, informative_groups, merge_rollouts
from mcpo_jax.mesh import to_host
from mcpo_jax.metrics import read_metrics
from mcpo_jax.rewards import ScoreResult
from mcpo_jax.sampling import Rollouts


def reference_choice(rewards: np.ndarray, group: int, target: int) -> tuple[list[int], list[bool]]:
  """Group by group: informative = not every reward equals the first; keep the first `target` informative
  groups, then pad with the first uninformative ones; return them in sampling order."""
  informative = []
  for start in range(0, len(rewards), group):
    informative.append(any(r != rewards[start] for r in rewards[start:start + group]))
  kept = [g for g, flag in enumerate(informative) if flag][:target]
  padding = [g for g, flag in enumerate(informative) if not flag][:target - len(kept)]
  chosen = sorted(kept + padding)
  return chosen, [informative[g] for g in chosen]


@pytest.mark.parametrize("seed", range(6))
def test_choose_groups_matches_the_reference_on_random_rewards(seed):
  rng = np.random.default_rng(seed)
  group, target = int(rng.integers(2, 6)), int(rng.integers(1, 6))
  rounds = int(rng.integers(1, 4))
  groups = target * rounds
  # Per group one of: all 0, all 1, all the same shaped reward, or drawn from a few values (mixed, or by chance not).
  kinds = rng.integers(0, 4, groups)
  rewards = np.concatenate([np.full(group, [0.0, 1.0, -0.25][k]) if k < 3 else rng.choice([0.0, 0.5, 1.0], group)
                            for k in kinds]).astype(np.float32)
  chosen, trained = choose_groups(informative_groups(rewards, group), target)
  want_chosen, want_trained = reference_choice(rewards, group, target)
  assert chosen.tolist() == want_chosen and trained.tolist() == want_trained
  assert len(chosen) == target  # the batch shape never changes


def test_choose_groups_pads_with_dropped_groups_and_refuses_too_few():
  informative = np.array([False, True, False, False, True, False])
  chosen, trained = choose_groups(informative, 4)
  assert chosen.tolist() == [0, 1, 2, 4] and trained.tolist() == [False, True, False, True]
  chosen, trained = choose_groups(informative, 1)
  assert chosen.tolist() == [1] and trained.tolist() == [True]
  with pytest.raises(ValueError, match="6 groups sampled; at least 7"):
    choose_groups(informative, 7)


def _rollouts(rng, rows: int, prompt_len: int, length: int) -> Rollouts:
  mask = (np.arange(length)[None] < rng.integers(1, length + 1, (rows, 1))).astype(np.int32)
  prompt_mask = (np.arange(prompt_len)[None] >= rng.integers(0, prompt_len, (rows, 1))).astype(np.int32)
  return Rollouts(tokens=rng.integers(3, 50, (rows, length)).astype(np.int32), logprobs=-rng.random((rows, length)),
                  response_mask=mask, lengths=mask.sum(1), truncated=mask.sum(1) == length,
                  prompt_tokens=np.where(prompt_mask, rng.integers(3, 50, (rows, prompt_len)), 0).astype(np.int32),
                  prompt_mask=prompt_mask)


def test_merge_rollouts_left_pads_prompts_and_keeps_every_row():
  rng = np.random.default_rng(0)
  parts = [_rollouts(rng, 4, 16, 5), _rollouts(rng, 4, 24, 5), _rollouts(rng, 4, 16, 5)]
  merged = merge_rollouts(parts, pad_id=0)
  assert merged.prompt_tokens.shape == (12, 24) and merged.tokens.shape == (12, 5)
  for index, part in enumerate(parts):
    rows = slice(4 * index, 4 * index + 4)
    width = part.prompt_tokens.shape[1]
    np.testing.assert_array_equal(merged.prompt_tokens[rows, 24 - width:], part.prompt_tokens)
    np.testing.assert_array_equal(merged.prompt_mask[rows, 24 - width:], part.prompt_mask)
    assert not merged.prompt_mask[rows, :24 - width].any() and not merged.prompt_tokens[rows, :24 - width].any()
    for name in ("tokens", "logprobs", "response_mask", "lengths", "truncated"):
      np.testing.assert_array_equal(getattr(merged, name)[rows], getattr(part, name))


# ------------------------------------------------------------------------------------- in-process run

GROUP, PROMPTS = 8, 4


def _fake_rewards(example: dict) -> list[float]:
  """By the prompt's index: all right, all wrong, or half right (then the group is informative)."""
  kind = example["index"] % 3
  return [1.0] * GROUP if kind == 0 else [0.0] * GROUP if kind == 1 else [1.0, 0.0] * (GROUP // 2)


def _run(learnable_task, workdir, monkeypatch, **data):
  """A 3-step GRPO run on the learnable task with the fake verifier; returns (sampled rewards per scoring call,
  (in_loss, rewards) of each trained batch, metrics.jsonl)."""
  from configs.multi_domain import get_config
  from mcpo_jax import config as config_lib
  model_dir, domains = learnable_task
  config = get_config("tiny")
  config.model.name = str(model_dir)
  config.data.domains = ast.literal_eval(domains)
  config.data.prompts_per_step, config.rollout.group_size = PROMPTS, GROUP
  config.data.update(data)
  config.rollout.max_new_tokens = config.eval.max_new_tokens = 1
  config.rewards.processes, config.algorithm, config.objective.kl_coef = 0, "grpo", 0.0
  config.eval.at_start = config.eval.at_end = False
  config.train.steps, config.diag_every, config.checkpoint.every = 3, 0, 0
  config.workdir = str(workdir)
  scored, trained = [], []

  def score(pool, tokenizer, rollouts, examples, group):
    rewards = np.array([r for example in examples for r in _fake_rewards(example)], np.float32)
    scored.append(rewards)
    return ScoreResult(rewards=rewards, correct=rewards >= 1, accuracy={}, errors=0, first_error=None)

  update = rl_loop.update_policy

  def recording_update(state, batch, *args, **kwargs):
    in_loss = None if batch.in_loss is None else to_host(batch.in_loss)
    trained.append((in_loss, to_host(batch.rewards)))
    return update(state, batch, *args, **kwargs)

  monkeypatch.setattr(rl_loop, "score_rollouts", score)
  monkeypatch.setattr(rl_loop, "update_policy", recording_update)
  rl_loop.train(config_lib.build(config))
  return scored, trained, read_metrics(workdir)


def test_only_informative_groups_are_trained_on(learnable_task, tmp_path, monkeypatch):
  scored, trained, metrics = _run(learnable_task, tmp_path / "dynamic", monkeypatch, dynamic_sampling=True,
                                  max_sampling_rounds=2)
  calls = iter(scored)
  cases = set()
  for step, (in_loss, rewards) in enumerate(trained, start=1):
    rounds = [next(calls) for _ in range(int(metrics[step]["sampling/extra_rounds"]) + 1)]
    sampled = np.concatenate(rounds)
    chosen, flags = reference_choice(sampled, GROUP, PROMPTS)
    want_rows = (np.array(chosen)[:, None] * GROUP + np.arange(GROUP)).reshape(-1)
    np.testing.assert_array_equal(rewards, sampled[want_rows])  # the batch holds exactly the chosen groups
    np.testing.assert_array_equal(in_loss, np.repeat(flags, GROUP))  # and trains only the informative ones
    groups = rewards.reshape(PROMPTS, GROUP)
    trains = in_loss.reshape(PROMPTS, GROUP)[:, 0].astype(bool)
    assert np.all(groups[trains].std(axis=1) > 0) and np.all(groups[~trains].std(axis=1) == 0)
    per_group = sampled.reshape(-1, GROUP)
    informative = per_group.std(axis=1) > 0
    assert metrics[step]["sampling/informative_groups"] == informative.sum()
    assert metrics[step]["sampling/dropped_groups"] == (~informative).sum() > 0  # all-right and all-wrong both
    assert (per_group == 1).all(axis=1).any() or (per_group == 0).all(axis=1).any()
    assert metrics[step]["sampling/padded_groups"] == PROMPTS - min(informative.sum(), PROMPTS)
    assert informative[:-PROMPTS].sum() < PROMPTS  # a new round only while the rounds before were short
    assert len(rounds) == 3 or informative.sum() >= PROMPTS  # and rounds stop at B informative groups or the cap
    cases.add("padded" if (~trains).any() else "full")
  assert next(calls, None) is None  # every scoring call belongs to a trained step
  assert metrics[1]["sampling/extra_rounds"] > 0
  assert cases == {"padded", "full"}, cases  # both ends: the cap reached, and B informative groups found

  scored_off, trained_off, metrics_off = _run(learnable_task, tmp_path / "plain", monkeypatch)
  assert len(scored_off) == 3 and all(in_loss is None for in_loss, _ in trained_off)
  assert any((rewards.reshape(PROMPTS, GROUP).std(axis=1) == 0).any() for _, rewards in trained_off)
  assert not any(name.startswith("sampling/") for name in metrics_off[1])
