"""The addition transfer task: operand pairs disjoint across splits in every format, the same pairs in
every format, number words right, no constant answer above 3% on the preset's eval sets, the stored
answer scores 1 and a wrong one 0, and batches resume exactly."""

import collections
import json

import numpy as np
import pytest

from mcpo_jax import rewards
from mcpo_jax.data import DataError, PromptIterator, open_source, parse_domains
from mcpo_jax.data.splits import SPLITS
from mcpo_jax.data.transfer import number_words, question, transfer_domains


def pairs(domain) -> dict[str, set[frozenset]]:
  return {split: {frozenset((e["metadata"]["a"], e["metadata"]["b"])) for e in open_source(domain.source, split, "d")}
          for split in SPLITS}


def test_operand_pairs_are_disjoint_across_splits_and_shared_across_formats():
  domains = parse_domains(transfer_domains())
  by_format = [pairs(domain) for domain in domains]
  assert len(domains) >= 3
  for split_pairs in by_format:
    assert split_pairs == by_format[0]  # every format asks the same problems in each split
  for first, second in ((0, 1), (0, 2), (1, 2)):
    used = [set().union(*(p[SPLITS[first]] for p in by_format)), set().union(*(p[SPLITS[second]] for p in by_format))]
    assert not used[0] & used[1]
  assert min(len(by_format[0][split]) for split in ("validation", "test")) >= 150


def test_every_format_states_the_same_operands():
  assert question("digits", 47, 5) == "What is 47 + 5?"
  assert question("words", 47, 5) == "What is forty-seven plus five?"
  story = question("story", 47, 5)
  assert "47" in story and "5" in story and story.endswith("?") and story.count("?") == 1


@pytest.mark.parametrize("number, words", [(0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"),
                                           (99, "ninety-nine"), (100, "one hundred"), (118, "one hundred eighteen"),
                                           (347, "three hundred forty-seven"), (1000, "one thousand"),
                                           (2019, "two thousand nineteen"),
                                           (9999, "nine thousand nine hundred ninety-nine")])
def test_number_words(number, words):
  assert number_words(number) == words


def test_no_constant_answer_scores_above_3_percent_on_the_eval_sets():
  from tests.test_splits import multi_domain
  config = multi_domain.get_config("transfer")
  for domain in parse_domains(config.data.domains):
    source = open_source(domain.source, config.eval.split, domain.name)
    answers = [source[index]["answer"] for index in range(config.eval.prompts_per_domain)]
    assert collections.Counter(answers).most_common(1)[0][1] / len(answers) <= 0.03
    sums = [int(answer) for answer in answers]
    assert max(sums) - min(sums) > 100


def test_stored_answer_scores_1_and_a_wrong_one_0():
  for domain in parse_domains(transfer_domains()):
    example = open_source(domain.source, "validation", domain.name)[0]
    verify = rewards.get(domain.verifier)
    assert verify(f"<answer>{example['answer']}</answer>", example) == 1.0
    assert verify(f"The answer is {example['answer']}.", example) == 1.0
    assert verify(f"<answer>{int(example['answer']) + 1}</answer>", example) == 0.0


def test_bad_settings_are_named():
  with pytest.raises(DataError, match=r"source\.format='roman'; choose one of \['digits', 'words', 'story'\]"):
    open_source({"kind": "addition", "format": "roman"}, "train", "d")
  with pytest.raises(DataError, match=r"low, high = 50, 20; use 0 <= low <= high <= 9999"):
    open_source({"kind": "addition", "format": "digits", "low": 50, "high": 20}, "train", "d")


def test_batches_resume_exactly():
  from mcpo_jax.model import load_tokenizer
  tokenizer = load_tokenizer("smollm2-135m-instruct")
  domains = parse_domains(transfer_domains())
  original = PromptIterator(domains, tokenizer, batch_size=4, seed=1, max_prompt_tokens=256)
  for _ in range(3):
    next(original)
  state = json.loads(json.dumps(original.get_state()))
  assert len(json.dumps(state)) < 400
  following = [next(original) for _ in range(3)]
  resumed = PromptIterator(domains, tokenizer, batch_size=4, seed=1, max_prompt_tokens=256)
  resumed.set_state(state)
  for expected, batch in zip(following, [next(resumed) for _ in range(3)]):
    assert np.array_equal(expected.prompt_tokens, batch.prompt_tokens) and expected.examples == batch.examples


def test_base_accuracy_table_has_every_domain_and_its_constant_answer_share(tiny_model_dir):
  from mcpo_jax.data.base_accuracy import constant_baseline, measure
  from tests.test_splits import multi_domain
  config = multi_domain.get_config("transfer")
  config.model.name = str(tiny_model_dir)
  config.rollout.max_new_tokens = 4
  from mcpo_jax.config import build
  table = measure(build(config), "validation", prompts=5, samples=2)
  rows = [line for line in table.splitlines() if line.startswith("| add_")]
  assert [row.split(" | ")[0] for row in rows] == ["| add_digits", "| add_story", "| add_words"]
  answers = [open_source(config.data.domains.add_words.to_dict()["source"], "validation", "w")[i]["answer"]
             for i in range(5)]
  assert rows[2].endswith(f"| {constant_baseline(answers):.3f} |")
  assert constant_baseline(["3", "4", "3", "5"]) == 0.5
