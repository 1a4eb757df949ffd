"""tpu_setup/prepare_data.py: hand-written rows in the public sets' schemas (DeepScaleR, DAPO-Math-17k,
CodeR1-12k, Knights-and-Knaves) become the files the paper-scale presets read, split the same way on
every run."""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mcpo_jax import rewards
from mcpo_jax.data import SPLITS, open_source

ROOT = Path(__file__).resolve().parents[1]


def load_module(path: Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


prepare = load_module(ROOT / "tpu_setup" / "prepare_data.py")
multi_domain = load_module(ROOT / "configs" / "multi_domain.py")

DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
               "Remember to put your answer on its own line after \"Answer:\".")
CODE_SYSTEM = "You are a helpful programming assistant. ... <think></think> and <answer></answer> tags ..."
FUNCTIONAL = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2\n\ncheck(Solution().double)"


def deepscaler(a: int, b: int) -> dict:
  return {"problem": f"What is ${a} \\times {b}$?", "answer": str(a * b), "solution": f"$\\boxed{{{a * b}}}$"}


def dapo(problem: str, answer: str) -> dict:
  return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": DAPO_PROMPT.format(problem=problem)}],
          "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule"},
          "extra_info": {"index": "a1b2"}}


def code_r1(question: str, ground_truth: str) -> dict:
  return {"data_source": "code", "ability": "coding",
          "prompt": [{"role": "system", "content": CODE_SYSTEM}, {"role": "user", "content": question}],
          "reward_model": {"style": "rule", "ground_truth": ground_truth},
          "extra_info": {"split": "train", "index": 0, "prompt": question, "reference": "", "dataset": "x"}}


def knights(names: list[str], roles: list[bool]) -> dict:
  said = ", and ".join(f"{n} is a {'knight' if r else 'knave'}" for n, r in zip(names, roles))
  return {"quiz": f"A very special island ... You meet {len(names)} inhabitants: {', '.join(names)}. "
                  "So who is a knight and who is a knave?",
          "names": names, "knight_knave": {"knight": "a knight", "knave": "a knave"}, "solution": roles,
          "solution_text": f"{said}.", "solution_text_format": "...", "index": len(names)}


MATH_ROWS = [deepscaler(a, b) for a in range(2, 6) for b in range(3, 8)]  # 20 questions
MATH_ROWS += [deepscaler(2, 3), deepscaler(4, 7)]  # two duplicates
DAPO_ROWS = [dapo("Find the sum of the roots of $x^2-5x+6=0$.", "5"), dapo("How many primes are below $20$?", "8")] * 3
IO_ROWS = [code_r1(f"Read two integers and print their sum plus {k}.",
                   json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": [f"{3 + k}\n", f"{10 + k}\n"]}))
           for k in range(12)]
SPECIAL_CODE_ROWS = [
    code_r1("Implement Solution.double(x), which returns 2 * x.", json.dumps({"functional": FUNCTIONAL})),
    code_r1("Write double_all(xs), doubling every element.",
            json.dumps({"fn_name": "double_all", "inputs": [[[1, 2]], [[]]], "outputs": [[2, 4], []]})),
    code_r1("Write add(a, b).", "assert add(1, 2) == 3\nassert add(0, 0) == 0"),
    code_r1("A task with broken tests.", "{not json and not python"),
    code_r1("A task whose cases do not pair up.", json.dumps({"inputs": ["1\n", "2\n"], "outputs": ["1\n"]})),
]
CODE_TEST_ROWS = [code_r1("Print the product of two integers.", json.dumps({"inputs": ["2 3\n"], "outputs": ["6\n"]})),
                  IO_ROWS[0]]  # also in train: it must leave train
PEOPLE = ["Zoey", "Oliver", "Ava", "Noah", "Liam", "Mia", "Ethan"]
KK_ROWS = [knights(PEOPLE[i:i + size], [bool((i + j) % 2) for j in range(size)])
           for size in (2, 3) for i in range(0, 5)]  # 10 quizzes
KK_TEST_ROWS = [knights(["Grace", "Lily"], [True, False]), KK_ROWS[0]]


def write_jsonl(path: Path, rows: list) -> Path:
  path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
  return path


def write_json(path: Path, rows: list) -> Path:
  """One JSON array, as DeepScaleR ships."""
  path.write_text(json.dumps(rows), encoding="utf-8")
  return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def inputs(folder: Path, shuffle: int | None = None) -> list[str]:
  """Command-line inputs of every schema, the rows optionally shuffled (same rows, other order)."""
  folder.mkdir()

  def order(rows: list) -> list:
    rows = list(rows)
    if shuffle is not None:
      random.Random(shuffle).shuffle(rows)
    return rows

  math = order(MATH_ROWS + DAPO_ROWS)
  files = {
      "math_json": write_json(folder / "deepscaler.json", [r for r in math if "prompt" not in r]),
      "math_verl": write_parquet(folder / "dapo-math-17k.parquet", [r for r in math if "prompt" in r]),
      "code": write_parquet(folder / "code-r1-train.parquet", order(IO_ROWS + SPECIAL_CODE_ROWS)),
      "code_test": write_parquet(folder / "code-r1-test.parquet", order(CODE_TEST_ROWS)),
      "logic_a": write_jsonl(folder / "people2.jsonl", order(KK_ROWS[:5])),
      "logic_b": write_jsonl(folder / "people3.jsonl", order(KK_ROWS[5:])),
      "logic_test": write_jsonl(folder / "kk-test.jsonl", order(KK_TEST_ROWS)),
  }
  return [f"--math={files['math_json']}", f"--math={files['math_verl']}", f"--code={files['code']}",
          f"--code_test={files['code_test']}", "--logic", str(files["logic_a"]), str(files["logic_b"]),
          f"--logic_test={files['logic_test']}", "--val_fraction=0.25", "--test_fraction=0.25"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
  code = prepare.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def read_outputs(out: Path) -> dict[str, dict[str, list[dict]]]:
  return {domain: {split: [json.loads(line) for line in (out / domain / f"{split}.jsonl").read_text().splitlines()]
                   for split in prepare.SPLITS} for domain in prepare.DOMAINS}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """One run over every schema into BUCKET/data, the layout of the presets."""
  bucket = tmp_path_factory.mktemp("bucket")
  argv = inputs(bucket / "downloads")
  assert prepare.main([*argv, f"--out={bucket / 'data'}"]) == 0
  return bucket, argv, read_outputs(bucket / "data")


def test_rows_of_each_schema_become_records():
  assert prepare.math_record(deepscaler(2, 3)) == {"problem": "What is $2 \\times 3$?", "answer": "6"}
  assert prepare.math_record(dapo("Find $x$ if $2x=6$.\n\nGive an integer.", "3")) == {
      "problem": "Find $x$ if $2x=6$.\n\nGive an integer.", "answer": "3"}
  assert prepare.math_record({"problem": "What is 1+1?", "answer": ""}) is None
  assert prepare.code_record(IO_ROWS[1]) == {"question": "Read two integers and print their sum plus 1.",
                                             "tests": {"inputs": ["1 2\n", "5 5\n"], "outputs": ["4\n", "11\n"]}}
  functional, calls, asserts, broken, unpaired = map(prepare.code_record, SPECIAL_CODE_ROWS)
  assert functional == {"question": "Implement Solution.double(x), which returns 2 * x.", "tests": FUNCTIONAL}
  assert calls["tests"] == {"inputs": [[[1, 2]], [[]]], "outputs": [[2, 4], []], "fn_name": "double_all"}
  assert asserts["tests"] == "assert add(1, 2) == 3\nassert add(0, 0) == 0"
  assert broken is None and unpaired is None
  assert prepare.logic_record(KK_ROWS[0]) == {"quiz": KK_ROWS[0]["quiz"],
                                              "solution_text": "Zoey is a knave, and Oliver is a knight."}


def test_outputs_hold_every_usable_question_once_in_one_split(prepared):
  _, _, outputs = prepared
  math = outputs["math"]
  assert set(math["test"][0]) == {"problem", "answer"}
  all_math = [record for split in prepare.SPLITS for record in math[split]]
  expected = {prepare.math_record(row)["problem"]: prepare.math_record(row) for row in MATH_ROWS + DAPO_ROWS}
  assert len(all_math) == len(expected) == 22  # 20 + 2 DAPO questions; duplicates dropped
  assert sorted(all_math, key=str) == sorted(expected.values(), key=str)
  assert {"problem": "How many primes are below $20$?", "answer": "8"} in all_math
  for split in prepare.SPLITS:  # no test file: the question's hash decides
    assert all(prepare.hash_split(r["problem"], 0.25, 0.25) == split for r in math[split])

  code = outputs["code"]
  assert code["test"] == sorted([prepare.code_record(row) for row in CODE_TEST_ROWS],
                                key=lambda r: prepare.question_hash(r["question"]))
  train_val = [r["question"] for split in ("train", "val") for r in code[split]]
  assert len(train_val) == 12 - 1 + 3  # IO rows less the one in the test file, plus 3 parsable special rows
  assert IO_ROWS[0]["prompt"][1]["content"] not in train_val and "A task with broken tests." not in train_val

  logic = outputs["logic"]
  assert [r["quiz"] for r in logic["test"]] == sorted([r["quiz"] for r in KK_TEST_ROWS], key=prepare.question_hash)
  assert len(logic["train"]) + len(logic["val"]) == 9
  assert KK_ROWS[0]["quiz"] not in [r["quiz"] for r in logic["train"] + logic["val"]]
  for domain, key in (("math", "problem"), ("code", "question"), ("logic", "quiz")):
    questions = [r[key] for split in prepare.SPLITS for r in outputs[domain][split]]
    assert len(questions) == len(set(questions))  # no question in two splits, none twice
    assert all(outputs[domain][split] for split in prepare.SPLITS)


def test_split_and_order_do_not_depend_on_the_input_order(prepared, tmp_path, capsys):
  bucket, _, _ = prepared
  code, out, _ = run(capsys, *inputs(tmp_path / "downloads", shuffle=3), f"--out={tmp_path / 'data'}")
  assert code == 0
  assert "math: read 28 rows; dropped 6 duplicate questions, 0 train questions also in the test files" in out
  assert "code: read 19 rows; dropped 0 duplicate questions, 1 train questions also in the test files, 2 rows " \
         "without a usable question or tests" in out
  for domain in prepare.DOMAINS:
    for split in prepare.SPLITS:
      name = f"{domain}/{split}.jsonl"
      assert (tmp_path / "data" / name).read_bytes() == (bucket / "data" / name).read_bytes(), name


def test_the_presets_load_the_written_files(prepared):
  bucket, _, outputs = prepared
  domains = multi_domain._paper_scale_domains(str(bucket))
  assert set(domains) == set(prepare.DOMAINS)
  for domain, spec in domains.items():
    assert rewards.get(spec["verifier"])
    for split, name in zip(SPLITS, prepare.SPLITS):
      examples = list(open_source(spec["source"], split, domain))
      assert len(examples) == len(outputs[domain][name])
  math = open_source(domains["math"]["source"], "train", "math")
  assert math[0] == {"prompt": outputs["math"]["train"][0]["problem"], "answer": outputs["math"]["train"][0]["answer"]}
  logic = open_source(domains["logic"]["source"], "test", "logic")
  assert {e["answer"] for e in logic} == {r["solution_text"] for r in KK_TEST_ROWS}
  code = [e for split in SPLITS for e in open_source(domains["code"]["source"], split, "code")]
  functional = next(e for e in code if e["prompt"].startswith("Implement Solution.double"))
  solution = "```python\nclass Solution:\n    def double(self, x):\n        return 2 * x\n```"
  assert rewards.get("code")(solution, functional) == 1.0
  assert rewards.get("code")(solution.replace("2 * x", "x + 2"), functional) == 0.0


def test_existing_files_are_kept_unless_overwrite(prepared, capsys):
  bucket, argv, _ = prepared
  before = (bucket / "data" / "math" / "train.jsonl").read_bytes()
  code, _, err = run(capsys, *argv, "--val_fraction=0.5", f"--out={bucket / 'data'}")
  assert code == 1 and len(err.strip().splitlines()) == 1
  assert f"{bucket / 'data' / 'math' / 'train.jsonl'}" in err and "pass --overwrite" in err
  assert (bucket / "data" / "math" / "train.jsonl").read_bytes() == before
  code, out, _ = run(capsys, *argv, f"--out={bucket / 'data'}", "--overwrite")
  assert code == 0 and "math/train.jsonl" in out
  assert (bucket / "data" / "math" / "train.jsonl").read_bytes() == before


def test_an_unknown_schema_names_the_file_row_and_columns(tmp_path, capsys):
  path = write_jsonl(tmp_path / "gsm8k.jsonl", [deepscaler(1, 2), {"question": "2+2?", "label": "4"}])
  code, _, err = run(capsys, f"--math={path}", f"--out={tmp_path / 'data'}")
  assert code == 1
  assert f"{path}: line 2: unknown math row schema; columns found: ['label', 'question']" in err
  table = write_parquet(tmp_path / "dapo.parquet", [dapo("1+1?", "2")] * 2)  # verl math passed as logic
  code, _, err = run(capsys, "--logic", str(table), f"--out={tmp_path / 'data'}")
  assert code == 1 and f"{table}: row 1: unknown logic row schema" in err and "'reward_model'" in err
  assert not (tmp_path / "data" / "logic" / "train.jsonl").exists()
