"""Turns downloaded Hugging Face sets into the JSONL files that the paper-scale presets read.

    python tpu_setup/prepare_data.py --math deepscaler/deepscaler.json --math_test math500/test.jsonl \
        --code code-r1-12k/data/train-*.parquet --code_test code-r1-12k/data/test-*.parquet \
        --logic kk/train/*.jsonl --logic_test kk/test/*.jsonl --out data

writes data/<domain>/{train,val,test}.jsonl with the fields of `configs/multi_domain.py`
(`_paper_scale_domains`): math {problem, answer}, code {question, tests}, logic {quiz, solution_text}.
Nothing is downloaded: inputs are local JSONL, JSON-array or Parquet files. Each row's schema is
detected on its own: verl rows (`prompt` = chat messages, `reward_model.ground_truth`: DAPO-Math-17k,
CodeR1-12k) or flat rows (DeepScaleR, MATH-500, Knights-and-Knaves).

Identical questions are kept once. Without a --<domain>_test file, a stable hash of the question puts
each row in train, val or test, so reruns and reordered inputs give the same split; with one, the test
file is the test split and its questions are removed from train and val. Each split is written in hash
order, a fixed shuffle: evaluation takes the first prompts of a split, which must not all come from one
input file (K&K's files go from 2 to 8 people).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

SPLITS = ("train", "val", "test")
# The instruction DAPO-Math-17k wraps each problem in; the config appends its own answer format.
DAPO_HEAD = "Solve the following math problem step by step."
DAPO_TAIL = "Remember to put your answer on its own line after"


class PrepareError(Exception):
  """A problem the user must fix; main prints it as one line."""


# Reading ---------------------------------------------------------------------------------------------

def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
  """(where, row) for every row of a JSONL, JSON-array or Parquet file; `where` is "file: line N"."""
  if not path.is_file():
    raise PrepareError(f"{path}: no such file")
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq
    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):  # DAPO-Math-17k has 1.8M rows
      for row in batch.to_pylist():
        number += 1
        yield f"{path}: row {number}", row
    return
  with path.open(encoding="utf-8") as handle:
    if handle.read(4096).lstrip().startswith("["):  # DeepScaleR ships one JSON array
      handle.seek(0)
      try:
        rows = json.load(handle)
      except json.JSONDecodeError as error:
        raise PrepareError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
      for number, row in enumerate(rows, start=1):
        yield f"{path}: item {number}", row
      return
    handle.seek(0)
    for number, line in enumerate(handle, start=1):
      if line.strip():
        try:
          yield f"{path}: line {number}", json.loads(line)
        except json.JSONDecodeError as error:
          raise PrepareError(f"{path}: line {number}: not valid JSON ({error.msg})") from None


# Conversion: one row -> one record, or None for a row of a known schema with nothing usable ------------

def text(value: Any) -> str:
  """A question as a stripped string; "" for anything else (missing, null, a list)."""
  return value.strip() if isinstance(value, str) else ""


def answer_text(value: Any) -> str:
  """A short final answer as a string (numbers too); "" when there is none."""
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    return ""
  return str(value).strip()


def is_verl(row: dict) -> bool:
  return "prompt" in row and "reward_model" in row


def last_user_message(prompt: Any) -> str:
  """The question of a verl row: the content of its last user message (a plain string is the question)."""
  if isinstance(prompt, str):
    return prompt.strip()
  users = [m.get("content") for m in prompt or [] if isinstance(m, dict) and m.get("role") == "user"]
  return text(users[-1]) if users else ""


def ground_truth(row: dict) -> Any:
  reward_model = row["reward_model"]
  return reward_model.get("ground_truth") if isinstance(reward_model, dict) else None


def strip_dapo_wrapper(prompt: str) -> str:
  """The bare problem of a DAPO-Math-17k prompt: drops its first and last paragraphs when they are the wrapper."""
  head, separator, rest = prompt.partition("\n\n")
  if separator and head.startswith(DAPO_HEAD):
    prompt = rest
  rest, separator, tail = prompt.rpartition("\n\n")
  if separator and tail.startswith(DAPO_TAIL):
    prompt = rest
  return prompt.strip()


def math_record(row: dict) -> dict | None:
  """{problem, answer} from a verl row (DAPO-Math-17k) or a flat one (DeepScaleR, MATH-500)."""
  if is_verl(row):
    problem, answer = strip_dapo_wrapper(last_user_message(row["prompt"])), answer_text(ground_truth(row))
  else:
    problem, answer = text(row["problem"]), answer_text(row["answer"])
  return {"problem": problem, "answer": answer} if problem and answer else None


def compiles(code: str) -> bool:
  try:
    compile(code, "tests", "exec")
    return True
  except (SyntaxError, ValueError):
    return False


def parse_tests(value: Any) -> str | dict | None:
  """Tests in a shape `mcpo_jax/rewards/code.py` runs, or None.

  CodeR1-12k stores JSON: {"inputs", "outputs"} (stdin/stdout), {"functional": code} (asserts run after
  the solution), or {"fn_name", "inputs", "outputs"} (calls); a string that is not JSON is asserts.
  """
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      return value if compiles(value) else None
    if isinstance(value, str):
      return value if compiles(value) else None
  if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
    value = "\n".join(value)
    return value if compiles(value) else None
  if not isinstance(value, dict):
    return None
  if isinstance(value.get("functional"), str):
    return value["functional"] if compiles(value["functional"]) else None
  inputs, outputs = value.get("inputs"), value.get("outputs")
  if not (isinstance(inputs, list) and isinstance(outputs, list) and inputs and len(inputs) == len(outputs)):
    return None
  tests = {"inputs": inputs, "outputs": outputs}
  if value.get("fn_name"):
    tests["fn_name"] = str(value["fn_name"])
  return tests


def code_record(row: dict) -> dict | None:
  """{question, tests} from a verl row (CodeR1-12k) or a row already in that layout."""
  if is_verl(row):
    question, tests = last_user_message(row["prompt"]), parse_tests(ground_truth(row))
  else:
    question, tests = text(row["question"]), parse_tests(row["tests"])
  return {"question": question, "tests": tests} if question and tests else None


def logic_record(row: dict) -> dict | None:
  """{quiz, solution_text} from a Knights-and-Knaves row."""
  quiz, solution = text(row["quiz"]), answer_text(row["solution_text"])
  return {"quiz": quiz, "solution_text": solution} if quiz and solution else None


# domain -> (conversion, the record's question field, flat columns it needs, whether verl rows are known)
DOMAINS: dict[str, tuple[Callable[[dict], dict | None], str, tuple[str, ...], bool]] = {
    "math": (math_record, "problem", ("problem", "answer"), True),
    "code": (code_record, "question", ("question", "tests"), True),
    "logic": (logic_record, "quiz", ("quiz", "solution_text"), False),
}


def check_schema(row: Any, domain: str, where: str) -> None:
  """Raises PrepareError naming the row and its columns when it is neither a verl nor a known flat row."""
  _, _, flat, verl = DOMAINS[domain]
  if isinstance(row, dict) and ((verl and is_verl(row)) or all(column in row for column in flat)):
    return
  columns = sorted(row) if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
  expected = f"{list(flat)}" + (" or verl ['prompt', 'reward_model']" if verl else "")
  raise PrepareError(f"{where}: unknown {domain} row schema; columns found: {columns}; expected {expected}")


# Splitting -------------------------------------------------------------------------------------------

def question_hash(question: str) -> float:
  """A number in [0, 1) fixed by the question alone: the same split on every run and in any order."""
  return int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") / 2**64


def hash_split(question: str, val_fraction: float, test_fraction: float) -> str:
  position = question_hash(question)
  return "test" if position < test_fraction else "val" if position < test_fraction + val_fraction else "train"


@dataclass
class Collected:
  """Records of one domain, one per question (the first seen), with counts of what was dropped."""
  domain: str
  records: dict[str, dict] = field(default_factory=dict)  # question -> record
  rows: int = 0
  duplicates: int = 0
  skipped: int = 0

  def add_files(self, paths: list[Path]) -> None:
    convert, key, _, _ = DOMAINS[self.domain]
    for path in paths:
      for where, row in read_rows(path):
        check_schema(row, self.domain, where)
        self.rows += 1
        record = convert(row)
        if record is None:
          self.skipped += 1
        elif record[key] in self.records:
          self.duplicates += 1
        else:
          self.records[record[key]] = record


def split_domain(train: Collected, test: Collected | None, val_fraction: float,
                 test_fraction: float) -> tuple[dict[str, list[dict]], int]:
  """{split: records in hash order} and the number of questions dropped from train/val for being in test."""
  splits: dict[str, list[tuple[float, dict]]] = {split: [] for split in SPLITS}
  in_test = 0
  for question, record in train.records.items():
    if test is not None and question in test.records:
      in_test += 1
      continue
    split = hash_split(question, val_fraction, 0.0 if test is not None else test_fraction)
    splits[split].append((question_hash(question), record))
  if test is not None:
    splits["test"] = [(question_hash(question), record) for question, record in test.records.items()]
  ordered = {split: [record for _, record in sorted(pairs, key=lambda pair: pair[0])]
             for split, pairs in splits.items()}
  return ordered, in_test


# Writing ---------------------------------------------------------------------------------------------

def output_path(out: Path, domain: str, split: str) -> Path:
  return out / domain / f"{split}.jsonl"


def write_jsonl(path: Path, records: list[dict]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as handle:
    for record in records:
      handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  for domain in DOMAINS:
    parser.add_argument(f"--{domain}", nargs="+", action="extend", type=Path, metavar="FILE",
                        help=f"{domain} files (JSONL, JSON array or Parquet)")
    parser.add_argument(f"--{domain}_test", nargs="+", action="extend", type=Path, metavar="FILE",
                        help=f"{domain} test files; default: hold out --test_fraction of --{domain}")
  parser.add_argument("--out", type=Path, required=True, help="output folder; files go to OUT/<domain>/")
  parser.add_argument("--val_fraction", type=float, default=0.02, help="share of questions held out for val")
  parser.add_argument("--test_fraction", type=float, default=0.02,
                      help="share held out for test when a domain has no test file")
  parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
  return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
  """The domains to write; raises PrepareError on settings that cannot work."""
  domains = [domain for domain in DOMAINS if getattr(args, domain)]
  for domain in DOMAINS:
    if getattr(args, f"{domain}_test") and not getattr(args, domain):
      raise PrepareError(f"--{domain}_test needs --{domain} (the train files)")
  if not domains:
    raise PrepareError(f"nothing to do: give at least one of {', '.join('--' + d for d in DOMAINS)}")
  if not (0 <= args.val_fraction and 0 <= args.test_fraction and args.val_fraction + args.test_fraction < 1):
    raise PrepareError("--val_fraction and --test_fraction must be >= 0 with a sum below 1")
  existing = [str(output_path(args.out, d, s)) for d in domains for s in SPLITS if output_path(args.out, d, s).exists()]
  if existing and not args.overwrite:
    others = f" and {len(existing) - 1} other output files" if len(existing) > 1 else ""
    raise PrepareError(f"{existing[0]}{others} already exist; pass --overwrite to replace them")
  return domains


def prepare_domain(domain: str, args: argparse.Namespace) -> tuple[dict[str, list[dict]], str]:
  """The domain's splits and a line saying what was read and dropped."""
  train = Collected(domain)
  train.add_files(getattr(args, domain))
  test = None
  if getattr(args, f"{domain}_test"):
    test = Collected(domain)
    test.add_files(getattr(args, f"{domain}_test"))
  splits, in_test = split_domain(train, test, args.val_fraction, args.test_fraction)
  read = [c for c in (train, test) if c is not None]
  summary = (f"{domain}: read {sum(c.rows for c in read)} rows; dropped {sum(c.duplicates for c in read)} duplicate "
             f"questions, {in_test} train questions also in the test files, {sum(c.skipped for c in read)} rows "
             f"without a usable {'question or tests' if domain == 'code' else 'question or answer'}")
  return splits, summary


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    prepared = {domain: prepare_domain(domain, args) for domain in check_args(args)}  # all read before any write
  except PrepareError as error:
    print(f"prepare_data.py: error: {error}", file=sys.stderr)
    return 1
  for domain, (splits, summary) in prepared.items():
    print(summary)
    for split, records in splits.items():
      path = output_path(args.out, domain, split)
      write_jsonl(path, records)
      print(f"  {path}: {len(records)} rows" + ("  (empty: the run cannot load this split)" if not records else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
