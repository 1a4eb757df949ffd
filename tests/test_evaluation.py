"""What the evaluation adds to recognise a collapsed policy: extracted answers, the share of the most common
one, the constant-answer baseline (scored by the real verifiers), the summary, and the per-prompt records."""

import collections

import numpy as np
import pytest

from mcpo_jax.evaluation import (constant_baselines, extracted_answer, prompt_hash, read_per_prompt, summarize,
                                 top_answer_share, write_eval)
from mcpo_jax.rewards import RewardPool


def _example(domain, answer, verifier="exact", **extra):
  return {"domain": domain, "prompt": f"question {domain} {answer} {extra}", "answer": answer, "verifier": verifier,
          "answer_format": "answer_tag", **extra}


def test_extracted_answer_is_normalised_like_the_verifiers():
  assert extracted_answer("I think <answer> 42. </answer>", _example("d", "42")) == "42"
  assert extracted_answer("so the answer is Yes.", _example("d", "yes")) == "yes"
  choice = _example("c", "B", "choice", choices=["red", "blue", "green"])
  assert extracted_answer("<answer>(b)</answer>", choice) == extracted_answer("<answer>blue</answer>", choice) == "B"
  assert extracted_answer("print(1)", _example("code", None, "code")) is None


def test_top_answer_share():
  assert top_answer_share(["2", "2", "3", None]) == 0.5
  assert top_answer_share([None, None, "1"]) == pytest.approx(2 / 3)  # no answer is an answer too
  assert np.isnan(top_answer_share([]))


def test_constant_baseline_is_the_best_single_answer():
  rng = np.random.default_rng(0)
  answers = [str(a) for a in rng.integers(0, 6, 40)]
  examples = [_example("small", a) for a in answers] + [_example("wide", str(i)) for i in range(50)]
  examples += [_example("halves", a, "math") for a in ["1/2", "0.5", "\\frac{1}{2}", "3", "7"]]
  examples += [_example("code", None, "code", tests=[])]
  with RewardPool(0) as pool:
    baselines = constant_baselines(examples, pool)
  # the exact verifier: the most frequent reference, counted independently
  assert baselines["small"] == collections.Counter(answers).most_common(1)[0][1] / len(answers)
  assert baselines["wide"] == 1 / 50
  assert baselines["halves"] == 3 / 5  # math-verify says 1/2 = 0.5 = \frac{1}{2}
  assert "code" not in baselines


def _record(domain, index, greedy, sampled, answer):
  return {"domain": domain, "index": index, "prompt_hash": prompt_hash({"prompt": f"q{index}"}),
          "question": f"q{index}", "reference": "1", "greedy_correct": greedy, "greedy_answer": answer, "sampled_correct": sampled,
          "sampled_answers": [answer] * len(sampled)}


def test_summary_flags_a_policy_at_or_below_its_constant_baseline(tmp_path):
  records = [_record("a", i, i < 3, [i < 2, False], "2" if i < 8 else "5") for i in range(10)]
  records += [_record("b", i, i < 6, [True, i < 6], str(i)) for i in range(10)]
  summary = summarize(records, {"a": 0.4, "b": 0.1}, k=2)
  assert summary["eval/a/pass@1"] == 0.3 and summary["eval/b/pass@1"] == 0.6
  assert summary["eval/a/mean@2"] == 0.1 and summary["eval/b/mean@2"] == 0.8
  assert summary["eval/a/collapsed"] == 1.0 and summary["eval/b/collapsed"] == 0.0
  assert summary["eval/a/top_answer_share"] == 0.8 and summary["eval/b/top_answer_share"] == 0.1
  assert summary["eval/mean/pass@1"] == pytest.approx(0.45)
  assert summary["eval/mean/constant_baseline"] == pytest.approx(0.25)
  assert summarize(records, {"a": 0.3, "b": 0.1}, k=2)["eval/a/collapsed"] == 1.0  # "at" counts
  write_eval(str(tmp_path), 7, summary, records)
  assert read_per_prompt(str(tmp_path), 7) == records
  assert (tmp_path / "eval" / "step_000007.json").exists()


def test_prompt_hash_ignores_case_and_spacing():
  assert prompt_hash({"prompt": "What is  2+2?\n"}) == prompt_hash({"prompt": "what is 2+2?"})
  assert prompt_hash({"prompt": "what is 2+3?"}) != prompt_hash({"prompt": "what is 2+2?"})
