"""Sources: reasoning-gym by name, JSONL / Parquet fixtures in the public sets' formats, TFDS array_record;
bad rows and bad settings are errors that name the file, line or field and the fix."""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mcpo_jax import rewards
from mcpo_jax.data import DataError, open_source, prepare_tfds
from mcpo_jax.data.records import RowError, lookup

FIXTURES = Path(__file__).parent / "fixtures"


def jsonl(name: str, fields: dict, **options) -> dict:
  return {"kind": "jsonl", "path": str(FIXTURES / name), "fields": fields, **options}


def test_gsm8k_and_math_answers_are_extracted():
  gsm8k = open_source(jsonl("gsm8k.jsonl", {"prompt": "question", "answer": "answer"}, answer_extract="gsm8k"),
                      "train", "gsm8k")
  assert [example["answer"] for example in gsm8k] == ["43", "1500", "147"]
  math = open_source(jsonl("math.jsonl", {"prompt": "problem", "answer": "solution"}, answer_extract="boxed"),
                     "train", "math")
  assert [example["answer"] for example in math] == [r"\frac{1}{2}", "6", "15"]
  assert rewards.get("math")(r"So it is \boxed{0.5}", math[0]) == 1.0


def test_multiple_choice_formats_become_letters():
  mmlu = open_source(jsonl("mmlu_science.jsonl", {"prompt": "question", "choices": "choices", "answer": "answer"}),
                     "train", "science")
  assert mmlu[0]["choices"][1] == "Carbon dioxide" and [e["answer"] for e in mmlu] == ["B", "C"]
  arc = open_source(jsonl("arc.jsonl", {"prompt": "question", "choices": "choices", "answer": "answerKey"}),
                    "train", "science")
  assert [e["answer"] for e in arc] == ["B", "B"]  # letter labels and numeric labels ("2")
  assert rewards.get("choice")("<answer>(B)</answer>", arc[1]) == 1.0
  physics = open_source(jsonl("mmlu_science.jsonl", {"prompt": "question", "choices": "choices", "answer": "answer",
                                                     "domain": "subject"}, domain_value="high_school_physics"),
                        "train", "science")
  assert len(physics) == 1 and physics[0]["answer"] == "C"


def test_knights_and_knaves_with_exact_match():
  kk = open_source(jsonl("knights_knaves.jsonl", {"prompt": "quiz", "answer": "solution_text"}), "train", "kk")
  assert rewards.get("exact")("<answer>Zoey is a knave, and Oliver is a knight</answer>", kk[0]) == 1.0
  assert rewards.get("exact")("<answer>Zoey is a knight, and Oliver is a knave</answer>", kk[0]) == 0.0


def test_code_sets_mbpp_and_taco_run_their_reference_solutions():
  import json
  mbpp = open_source(jsonl("mbpp.jsonl", {"prompt": "text", "tests": "test_list"}), "train", "code")
  assert mbpp[0]["tests"].count("assert") == 3
  code_score = rewards.get("code")
  reference = [json.loads(line)["code"] for line in (FIXTURES / "mbpp.jsonl").read_text().splitlines()]
  assert [code_score(f"```python\n{code}\n```", example) for code, example in zip(reference, mbpp)] == [1, 1]
  taco = open_source(jsonl("taco.jsonl", {"prompt": "question", "tests": "input_output"}), "train", "code")
  assert taco[0]["tests"]["inputs"] == ["1 2\n", "10 -3\n"] and taco[1]["tests"]["fn_name"] == "double_all"
  lines = (FIXTURES / "taco.jsonl").read_text().splitlines()
  solutions = [json.loads(json.loads(line)["solutions"])[0] for line in lines]
  assert [code_score(f"```python\n{code}\n```", example) for code, example in zip(solutions, taco)] == [1, 1]


def test_parquet_deepscaler_style(tmp_path):
  rows = [{"problem": "What is 1/2 + 1/4?", "answer": "\\frac{3}{4}", "solution": "..."},
          {"problem": "What is 6 * 7?", "answer": "42", "solution": "..."}]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
  pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "test.parquet")
  spec = {"kind": "parquet", "path": str(tmp_path / "{split}.parquet"),
          "fields": {"prompt": "problem", "answer": "answer"}}
  train = open_source(spec, "train", "math")
  assert [e["answer"] for e in train] == ["42"] and train.overlap_rows == 1  # the test question is not trained on
  assert len(open_source(spec, "test", "math")) == 1
  pq.write_table(pa.Table.from_pylist([{"problem": "x", "answer": "1"}, {"problem": "y", "answer": ""}]),
                 tmp_path / "validation.parquet")
  with pytest.raises(DataError, match=r"validation\.parquet:2: the row has neither an answer \('answer'\)"):
    open_source(spec, "validation", "math")


def test_malformed_rows_name_file_and_line_or_are_skipped_and_counted():
  fields = {"prompt": "question", "answer": "answer"}
  with pytest.raises(DataError, match=r"bad_rows\.jsonl:3: not valid JSON .*skip_bad_rows=True"):
    open_source(jsonl("bad_rows.jsonl", fields, answer_extract="gsm8k"), "train", "d")
  source = open_source(jsonl("bad_rows.jsonl", fields, answer_extract="gsm8k", skip_bad_rows=True), "train", "d")
  assert [e["answer"] for e in source] == ["4", "8"] and source.skipped_rows == 2


def test_missing_field_error_names_the_fields_that_exist():
  fields_named = r"gsm8k\.jsonl:1: field 'problem' is missing; the row has fields \['answer', 'question'\]"
  with pytest.raises(DataError, match=fields_named):
    open_source(jsonl("gsm8k.jsonl", {"prompt": "problem", "answer": "answer"}), "train", "d")
  with pytest.raises(RowError, match=r"field 'a\.c' is missing; a has fields \['b'\]"):
    lookup({"a": {"b": 1}}, "a.c")


def test_bad_source_settings_are_named():
  with pytest.raises(DataError, match=r"source\.kind='json' \(did you mean 'jsonl'\?\)"):
    open_source({"kind": "json", "path": "x", "fields": {}}, "train", "d")
  with pytest.raises(DataError, match=r"source\.skip_bad_row is not a jsonl source setting \(did you mean 'skip_bad_r"):
    open_source(jsonl("gsm8k.jsonl", {"prompt": "question"}, skip_bad_row=True), "train", "d")
  with pytest.raises(DataError, match=r"source\.fields has \['question'\], which are not example fields"):
    open_source(jsonl("gsm8k.jsonl", {"question": "question"}), "train", "d")
  with pytest.raises(DataError, match=r"single file, used for 'train' only"):
    open_source(jsonl("gsm8k.jsonl", {"prompt": "question", "answer": "answer"}), "test", "d")
  with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
    open_source(jsonl("missing.jsonl", {"prompt": "question"}), "train", "d")


def test_reasoning_gym_splits_and_errors():
  spec = {"kind": "reasoning_gym", "dataset": "basic_arithmetic", "config": {"max_terms": 2}, "size": 50}
  train, again, test = open_source(spec, "train", "a"), open_source(spec, "train", "a"), open_source(spec, "test", "a")
  assert len(train) == 50 and [train[i] for i in range(5)] == [again[i] for i in range(5)]
  assert [train[i]["prompt"] for i in range(5)] != [test[i]["prompt"] for i in range(5)]
  with pytest.raises(DataError, match=r"'basic_arithmetik' \(did you mean 'basic_arithmetic'\?\); known: ab,"):
    open_source({**spec, "dataset": "basic_arithmetik"}, "train", "a")
  with pytest.raises(DataError, match=r"has no settings \['max_term'\]; its settings: min_terms, max_terms"):
    open_source({**spec, "config": {"max_term": 2}}, "train", "a")


def test_tfds_array_record_round_trip_without_tensorflow(tmp_path):
  fields = {"prompt": "question", "choices": "choices", "answer": "answer"}
  (tmp_path / "test.jsonl").write_text((FIXTURES / "mmlu_science.jsonl").read_text().splitlines()[0] + "\n")
  files = {"train": FIXTURES / "mmlu_science.jsonl", "test": tmp_path / "test.jsonl"}
  directory = prepare_tfds("science_mc", files, str(tmp_path), fields=fields)
  assert sorted(p.name for p in directory.iterdir() if "array_record" in p.name) == [
      "science_mc-test.array_record-00000-of-00001", "science_mc-train.array_record-00000-of-00001"]
  spec = {"kind": "tfds", "name": "science_mc", "data_dir": str(tmp_path)}
  expected = open_source(jsonl("mmlu_science.jsonl", fields), "train", "science")
  assert list(open_source(spec, "test", "science")) == [expected[0]]
  assert list(open_source(spec, "train", "science")) == [expected[1]]  # without the test split's question
  code_fields = {"prompt": "question", "tests": "input_output"}
  prepare_tfds("taco_code", {"train": FIXTURES / "taco.jsonl"}, str(tmp_path), fields=code_fields)
  code = open_source({"kind": "tfds", "name": "taco_code", "data_dir": str(tmp_path)}, "train", "code")
  assert sorted(code, key=str) == sorted(open_source(jsonl("taco.jsonl", code_fields), "train", "code"), key=str)
  assert "tensorflow" not in sys.modules
  with pytest.raises(DataError, match=r"tfds:science_mc/validation cannot be read"):
    open_source(spec, "validation", "science")
