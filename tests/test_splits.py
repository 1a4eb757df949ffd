"""Leak-free splits: for every offline preset's domains, train / validation / test share no question;
held-out splits hold each problem once; file sources drop a later split's questions from earlier
splits; a test split smaller than the eval set is one clear error."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mcpo_jax.data import DataError, open_source, parse_domains
from mcpo_jax.data.inspect import report
from mcpo_jax.data.splits import SPLITS, split_of

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ITEMS = 3000  # a generator's train split is endless in effect: read this much of it


def load_presets():
  spec = importlib.util.spec_from_file_location("multi_domain", ROOT / "configs" / "multi_domain.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules["multi_domain"] = module
  spec.loader.exec_module(module)
  return module


multi_domain = load_presets()


def normalised(text: str) -> str:
  return " ".join(text.lower().split())


def questions(source, limit: int) -> list[str]:
  return [normalised(source[index]["prompt"]) for index in range(min(len(source), limit))]


def offline_domains() -> dict[str, dict]:
  """Every preset's domains that need no remote files, once each (presets share domains)."""
  found = {}
  for preset in multi_domain.PRESETS:
    for name, settings in multi_domain.get_config(preset).data.domains.to_dict().items():
      if "gs://" not in json.dumps(settings):
        found.setdefault(json.dumps(settings, sort_keys=True), (preset, name, settings))
  return {f"{preset}/{name}": settings for preset, name, settings in found.values()}


@pytest.mark.parametrize("label", sorted(offline_domains()))
def test_preset_domains_have_disjoint_splits_of_distinct_held_out_problems(label):
  settings = offline_domains()[label]
  read = {split: questions(open_source(settings["source"], split, label), TRAIN_ITEMS) for split in SPLITS}
  for split in ("validation", "test"):
    assert len(read[split]) == len(set(read[split])) > 0, f"{label} {split} repeats a problem"
  for index, first in enumerate(SPLITS):
    for second in SPLITS[index + 1:]:
      shared = set(read[first]) & set(read[second])
      assert not shared, f"{label}: {first} and {second} share {len(shared)} problems, e.g. {sorted(shared)[:2]}"


def test_every_offline_preset_is_covered():
  names = {label.split("/")[1] for label in offline_domains()}
  assert {"arithmetic", "gcd", "logic", "add_digits", "add_words", "add_story"} <= names


def test_a_small_generator_holds_every_problem_of_its_space_in_exactly_one_split():
  """basic_arithmetic with 1-digit operands has a few hundred problems; their hashes decide their split."""
  import reasoning_gym
  spec = {"kind": "reasoning_gym", "dataset": "basic_arithmetic", "seed": 5,
          "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
                     "allow_parentheses": False, "allow_negation": False}}
  space = {entry["question"] for entry in reasoning_gym.create_dataset(spec["dataset"], seed=99, size=20_000,
                                                                       **spec["config"])}
  for split in ("validation", "test"):
    expected = {normalised(q) for q in space if split_of(q) == split}
    assert set(questions(open_source(spec, split, "a"), 10_000)) == expected and 10 < len(expected) < 60
  train = open_source(spec, "train", "a")
  assert {q for q in questions(train, 5000)} <= {normalised(q) for q in space if split_of(q) == "train"}
  assert train[1234] == open_source(spec, "train", "a")[1234]  # random access is deterministic
  with pytest.raises(IndexError):
    train[len(train)]


def write_jsonl(path: Path, questions_: list[str]) -> None:
  path.write_text("".join(json.dumps({"q": q, "a": str(len(q))}) + "\n" for q in questions_))


def test_file_splits_drop_later_splits_questions_and_held_out_repeats(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", ["What is 1+1?", "what is  2+2?", "What is 3+3?", "What is 4+4?",
                                         "What is 4+4?"])
  write_jsonl(tmp_path / "validation.jsonl", ["What is 2+2?", "What is 5+5?", "What is 5+5?", "What is 6+6?"])
  write_jsonl(tmp_path / "test.jsonl", ["What is 3+3?", "WHAT IS 6+6?", "What is 7+7?"])
  spec = {"kind": "jsonl", "path": str(tmp_path / "{split}.jsonl"), "fields": {"prompt": "q", "answer": "a"}}
  train, validation, test = (open_source(spec, split, "d") for split in SPLITS)
  assert [e["prompt"] for e in test] == ["What is 3+3?", "WHAT IS 6+6?", "What is 7+7?"]  # as given
  assert [e["prompt"] for e in validation] == ["What is 2+2?", "What is 5+5?"]
  assert (validation.overlap_rows, validation.duplicate_rows) == (1, 1)
  assert [e["prompt"] for e in train] == ["What is 1+1?", "What is 4+4?", "What is 4+4?"]  # train may repeat
  assert (train.overlap_rows, train.duplicate_rows) == (2, 0)
  table, overlap = report(parse_domains({"d": {"source": spec, "verifier": "exact"}}), 100)
  assert overlap == 0 and "| d | 3 / 2 | 2 / 2 | 3 / 3 | 0 | 0 | 0 |" in table
  write_jsonl(tmp_path / "validation.jsonl", ["What is 7+7?"])
  with pytest.raises(DataError, match=r"\(validation split\): all 1 rows also occur in a later split"):
    open_source(spec, "validation", "d")


def test_a_test_split_smaller_than_the_eval_set_is_one_clear_error():
  from mcpo_jax.evaluation import build_eval_set
  from mcpo_jax.model import load_tokenizer
  domains = parse_domains({"arithmetic": multi_domain.get_config().data.domains.arithmetic.to_dict()})
  test_size = len(open_source(domains[0].source, "test", "arithmetic"))
  tokenizer = load_tokenizer("smollm2-135m-instruct")
  eval_set = build_eval_set(domains, tokenizer, prompts_per_domain=test_size, split="test", max_prompt_tokens=256)
  assert len({e["prompt"] for e in eval_set.examples}) == test_size
  message = (rf"domain 'arithmetic': its test split has {test_size} distinct problems of at most 256 prompt tokens, "
             rf"fewer than eval.prompts_per_domain=150; set --config.eval.prompts_per_domain={test_size} or less")
  with pytest.raises(DataError, match=message):
    build_eval_set(domains, tokenizer, prompts_per_domain=150, split="test", max_prompt_tokens=256)


def test_split_shares_are_checked_and_move_problems():
  spec = {"kind": "reasoning_gym", "dataset": "gcd", "config": {"min_value": 2, "max_value": 20}}
  small = len(open_source(spec, "test", "g"))
  large = len(open_source({**spec, "split_shares": [0.5, 0.1, 0.4]}, "test", "g"))
  assert large > 2 * small
  with pytest.raises(DataError, match=r"split_shares=\[0.5, 0.5\]; give three positive shares"):
    open_source({**spec, "split_shares": [0.5, 0.5]}, "test", "g")


def test_paper_preset_domains_on_small_local_files_have_disjoint_splits(tmp_path):
  """The paper presets read gs:// files; the same domain specs on local files with planted overlaps."""
  domains = multi_domain._paper_scale_domains(str(tmp_path))
  rows = {"math": lambda i: {"problem": f"What is {i} squared?", "answer": str(i * i)},
          "code": lambda i: {"question": f"Return {i}.", "tests": f"assert f() == {i}"},
          "logic": lambda i: {"quiz": f"Is {i} a knight?", "solution_text": "yes"}}
  numbers = {"train": range(0, 30), "val": [*range(25, 35), 33], "test": [*range(32, 40), 5, 39]}  # overlaps
  for name, make in rows.items():
    (tmp_path / "data" / name).mkdir(parents=True)
    for split, values in numbers.items():
      (tmp_path / "data" / name / f"{split}.jsonl").write_text("".join(json.dumps(make(i)) + "\n" for i in values))
  for name, settings in domains.items():
    read = {split: questions(open_source(settings["source"], split, name), 100) for split in SPLITS}
    assert [len(read[split]) for split in SPLITS] == [24, 7, 9]  # train 30 - 6; validation 10 - 3; test 10 - 1
    for index, first in enumerate(SPLITS):
      assert len(set(read[first])) == len(read[first]) or first == "train"
      for second in SPLITS[index + 1:]:
        assert not set(read[first]) & set(read[second])
