"""Domains from config, mixing by weight, chat-templated left-padded batches, counted length filtering,
exact resume; and for every default reasoning-gym domain, its stored answer scores 1 and a wrong one 0."""

import json
from pathlib import Path

import numpy as np
import pytest

from mcpo_jax import rewards
from mcpo_jax.data import DataError, PromptIterator, default_domains, domain_id, open_source, parse_domains
from mcpo_jax.data.mixing import batch_counts, example_index

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K = {"kind": "jsonl", "path": str(FIXTURES / "gsm8k.jsonl"), "fields": {"prompt": "question", "answer": "answer"},
         "answer_extract": "gsm8k"}


@pytest.fixture(scope="module")
def tokenizer():
  from mcpo_jax.model import load_tokenizer
  return load_tokenizer("smollm2-135m-instruct")


def test_mixing_ratios_hold_over_1000_batches():
  for weights, batch_size in (([0.5, 0.3, 0.2], 16), ([0.6, 0.25, 0.1, 0.05], 20), ([1 / 3] * 3, 8)):
    weights = np.array(weights)
    emitted = np.zeros(len(weights), np.int64)
    for step in range(1000):
      counts = batch_counts(weights, batch_size, emitted, step)
      assert counts.sum() == batch_size and counts.min() >= 1  # every domain in every batch
      emitted += counts
    assert np.abs(emitted / emitted.sum() - weights).max() < 0.02


def test_a_tiny_domain_still_appears_every_batch():
  emitted = np.zeros(2, np.int64)
  for step in range(100):
    counts = batch_counts(np.array([0.99, 0.01]), 8, emitted, step)
    assert counts.tolist() == [7, 1]
    emitted += counts
  with pytest.raises(ValueError, match="below the 3 trained domains"):
    batch_counts(np.ones(3) / 3, 2, np.zeros(3, np.int64), 0)


def test_each_epoch_visits_every_example_once_in_a_seeded_order():
  first = [example_index(0, "math", 10, position) for position in range(10)]
  second = [example_index(0, "math", 10, position) for position in range(10, 20)]
  assert sorted(first) == sorted(second) == list(range(10)) and first != second
  assert first != [example_index(1, "math", 10, position) for position in range(10)]


def test_default_domains_stored_answer_scores_1_and_wrong_answer_0():
  score = rewards.get("gym")
  for domain in parse_domains(default_domains()):
    assert domain.verifier == "gym" and domain.source["kind"] == "reasoning_gym"
    source = open_source(domain.source, "train", domain.name)
    for index in range(5):
      example = source[index]
      assert score(f"Let me see.\n<answer>{example['answer']}</answer>", example) == 1.0, (domain.name, example)
      assert score(f"<answer>{example['answer']}x</answer>", example) == 0.0, (domain.name, example)
      flipped = {"Yes": "No", "No": "Yes"}.get(example["answer"])
      if flipped:
        assert score(f"<answer>{flipped}</answer>", example) == 0.0


def test_batches_are_left_padded_chat_prompts_tagged_with_domain_and_prompt(tokenizer):
  domains = parse_domains(default_domains())
  batch = next(PromptIterator(domains, tokenizer, batch_size=6, seed=0, max_prompt_tokens=256))
  assert batch.prompt_tokens.dtype == batch.prompt_mask.dtype == np.int32 and batch.prompt_tokens.shape[0] == 6
  assert batch.domain_id.tolist() == [0, 0, 1, 1, 2, 2] and batch.prompt_id.tolist() == list(range(6))
  assert (np.diff(batch.prompt_mask, axis=1) >= 0).all() and batch.prompt_mask[:, -1].all()  # padding on the left
  assert (batch.prompt_tokens[batch.prompt_mask == 0] == tokenizer.pad_token_id).all()
  for row, example in enumerate(batch.examples):
    assert example["domain"] == domains[batch.domain_id[row]].name and example["verifier"] == "gym"
    text = tokenizer.decode(batch.prompt_tokens[row][batch.prompt_mask[row] == 1])
    assert example["prompt"] in text and "<answer>" in text and text.endswith("<|im_start|>assistant\n")
  assert batch.verifier_names == ["gym"] * 6


def test_choices_and_system_prompt_are_rendered(tokenizer):
  science = {"kind": "jsonl", "path": str(FIXTURES / "mmlu_science.jsonl"),
             "fields": {"prompt": "question", "choices": "choices", "answer": "answer"}}
  domains = parse_domains([{"name": "science", "source": science, "verifier": "choice", "answer_format": "boxed",
                            "system_prompt": "You are a careful scientist."}])
  batch = next(PromptIterator(domains, tokenizer, batch_size=2, seed=0, max_prompt_tokens=256))
  text = tokenizer.decode(batch.prompt_tokens[0][batch.prompt_mask[0] == 1])
  assert "You are a careful scientist." in text and "\\boxed{}" in text and "\nB. " in text


def test_a_domain_of_weight_zero_is_never_trained_on(tokenizer):
  emitted = np.zeros(3, np.int64)
  for step in range(200):  # the others keep their ratio and their one-row floor
    counts = batch_counts(np.array([0.75, 0.0, 0.25]), 4, emitted, step)
    assert counts[1] == 0 and counts.sum() == 4 and counts.min(initial=9, where=[True, False, True]) >= 1
    emitted += counts
  assert emitted.tolist() == [600, 0, 200]
  assert batch_counts(np.array([0.0, 1.0, 0.0]), 1, np.zeros(3, np.int64), 0).tolist() == [0, 1, 0]
  domains = parse_domains({"a": {"source": GSM8K, "verifier": "math"}, "b": {"source": GSM8K, "verifier": "math",
                                                                           "weight": 0}})
  iterator = PromptIterator(domains, tokenizer, batch_size=1, seed=0, max_prompt_tokens=256)  # B ≥ trained domains
  assert [batch.domain_id.tolist() for batch in (next(iterator) for _ in range(5))] == [[0]] * 5
  with pytest.raises(DataError, match=r"every domain has weight 0, so there is nothing to train on"):
    parse_domains({"a": {"source": GSM8K, "verifier": "math", "weight": 0.0}})


def test_iterator_follows_the_weights(tokenizer):
  domains = parse_domains({"a": {"source": GSM8K, "verifier": "math", "weight": 3},
                           "b": {"source": GSM8K, "verifier": "math", "weight": 1}})
  iterator = PromptIterator(domains, tokenizer, batch_size=4, seed=0, max_prompt_tokens=256)
  ids = np.concatenate([next(iterator).domain_id for _ in range(25)])
  assert np.bincount(ids).tolist() == [75, 25]


def test_over_long_prompts_are_skipped_and_counted(tokenizer):
  domains = parse_domains({"gsm8k": {"source": GSM8K, "verifier": "math"}})
  lengths = sorted(PromptIterator(domains, tokenizer, batch_size=3, seed=0, max_prompt_tokens=999)
                   .__next__().prompt_mask.sum(axis=1).tolist())
  iterator = PromptIterator(domains, tokenizer, batch_size=3, seed=0, max_prompt_tokens=lengths[1])
  batch = next(iterator)
  assert batch.prompt_mask.sum(axis=1).max() <= lengths[1]
  assert iterator.stats()["filtered_long"] == {"gsm8k": 1}  # one of three per epoch is too long
  with pytest.raises(DataError, match=r"3 prompts in a row are longer than max_prompt_tokens=5; raise it"):
    next(PromptIterator(domains, tokenizer, batch_size=1, seed=0, max_prompt_tokens=5))


def test_restoring_state_yields_exactly_the_following_batches(tokenizer):
  domains = parse_domains({**default_domains(), "gsm8k": {"source": GSM8K, "verifier": "math", "weight": 0.5}})
  settings = dict(batch_size=7, seed=3, max_prompt_tokens=89)  # some logic prompts (88-90 tokens) are filtered
  original = PromptIterator(domains, tokenizer, **settings)
  for _ in range(4):
    next(original)
  state = json.loads(json.dumps(original.get_state()))
  following = [next(original) for _ in range(3)]
  resumed = PromptIterator(domains, tokenizer, **settings)
  resumed.set_state(state)
  for expected, batch in zip(following, [next(resumed) for _ in range(3)]):
    assert np.array_equal(expected.prompt_tokens, batch.prompt_tokens) and np.array_equal(expected.domain_id, batch.domain_id)
    assert expected.examples == batch.examples
  assert resumed.get_state() == original.get_state() and sum(resumed.stats()["filtered_long"].values()) > 0
  with pytest.raises(DataError, match=r"saved data state has seed=3 but this run has 4"):
    PromptIterator(domains, tokenizer, **{**settings, "seed": 4}).set_state(state)


def test_domain_config_errors_list_what_is_allowed():
  gym = {"source": {"kind": "reasoning_gym", "dataset": "basic_arithmetic"}, "verifier": "gym"}
  known = r"domains\.a\.verifier: unknown verifier 'gim' \(did you mean 'gym'\?\); known verifiers: math, choice"
  with pytest.raises(DataError, match=known):
    parse_domains({"a": {**gym, "verifier": "gim"}})
  with pytest.raises(DataError, match=r"domains\.a\.wieght is not a domain setting \(did you mean 'weight'\?\)"):
    parse_domains({"a": {**gym, "wieght": 2}})
  with pytest.raises(DataError, match=r"domains\.a\.weight=-1; use a positive number, or 0 to evaluate the domain"):
    parse_domains({"a": {**gym, "weight": -1}})
  with pytest.raises(DataError, match=r"answer_format='xml'; choose one of \['answer_tag', 'boxed', 'code_block'\]"):
    parse_domains({"a": {**gym, "answer_format": "xml"}})
  with pytest.raises(DataError, match=r"domains\[1\]\.source is missing"):
    parse_domains([{"name": "a", **gym}, {"name": "b", "verifier": "gym"}])
  with pytest.raises(DataError, match=r"names \['a'\] more than once"):
    parse_domains([{"name": "a", **gym}, {"name": "a", **gym}])
  with pytest.raises(DataError, match=r"domains\.a\.source\.dataset is missing"):
    parse_domains({"a": {**gym, "source": {"kind": "reasoning_gym"}}})
  domains = parse_domains(default_domains())
  assert domain_id(domains, "logic") == 2
  with pytest.raises(DataError, match=r"unknown domain 'code'; known domains: arithmetic, gcd, logic"):
    domain_id(domains, "code")
  with pytest.raises(DataError, match=r"batch_size=2 is below the number of trained domains \(3\)"):
    PromptIterator(domains, None, batch_size=2, seed=0, max_prompt_tokens=64)


def test_config_dict_domains_can_be_overridden_by_field():
  import ml_collections
  config = ml_collections.ConfigDict({"domains": default_domains()})
  config.domains.gcd.weight = 2.0
  domains = parse_domains(config.domains)
  assert [(d.name, d.weight) for d in domains] == [("arithmetic", 1.0), ("gcd", 2.0), ("logic", 1.0)]
