"""Turning a raw row of a public dataset into the canonical example that prompts and verifiers use.

Canonical example (plain Python, picklable):
  prompt: str                  the question shown to the model
  answer: str | list[str]      the reference (a list: several accepted answers); absent for code
  choices: list[str]           multiple choice: the options, lettered A, B, ... in the prompt; answer is a letter
  tests: str | dict            code: asserts, or {"inputs", "outputs"[, "fn_name"]} (see rewards/code.py)
  entry_point: str             code: the function HumanEval's `check` receives

A field map says where each canonical field lives in the row: {"prompt": "question", "answer":
"answerKey", "choices": "choices.text"}; dotted names reach into nested objects. `answer_extract`
turns a worked solution into the answer: "gsm8k" takes the text after the last "####", "boxed" the
last \\boxed{}.
"""

from __future__ import annotations

import json
import string
from typing import Any, Mapping

from mcpo_jax.rewards.extract import last_boxed

CANONICAL_FIELDS = ("prompt", "answer", "choices", "tests", "entry_point", "domain")
ANSWER_EXTRACTORS = ("none", "gsm8k", "boxed")


class RowError(ValueError):
  """A problem with one row; the reader adds the file and line."""


def lookup(row: Mapping[str, Any], dotted: str) -> Any:
  """row["a"]["b"] for "a.b"; a missing key raises RowError listing the keys that exist at that level."""
  value: Any = row
  for depth, key in enumerate(dotted.split(".")):
    if not isinstance(value, Mapping) or key not in value:
      where = ".".join(dotted.split(".")[:depth]) or "the row"
      existing = sorted(value) if isinstance(value, Mapping) else f"a {type(value).__name__}, not an object"
      raise RowError(f"field {dotted!r} is missing; {where} has fields {existing}")
    value = value[key]
  return value


def _empty(value: Any) -> bool:
  return value is None or (isinstance(value, (str, list, dict, tuple)) and len(value) == 0)


def _choices(value: Any) -> tuple[list[str], list[str]]:
  """(texts, labels) from a list of strings, {"text": [...], "label": [...]}, or [{"text", "label"}, ...]."""
  if isinstance(value, Mapping) and "text" in value:
    texts, labels = list(value["text"]), list(value.get("label") or string.ascii_uppercase[:len(value["text"])])
  elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
    texts, labels = [v["text"] for v in value], [v.get("label", string.ascii_uppercase[i]) for i, v in enumerate(value)]
  elif isinstance(value, (list, tuple)):
    texts, labels = list(value), list(string.ascii_uppercase[:len(value)])
  else:
    raise RowError(f"choices must be a list of strings or {{'text': [...], 'label': [...]}}; got {value!r:.80}")
  if len(texts) > 26 or len(texts) != len(labels) or not all(isinstance(t, str) for t in texts):
    raise RowError(f"choices must be at most 26 strings with one label each; got {value!r:.80}")
  return texts, [str(label) for label in labels]


def _choice_letter(answer: Any, labels: list[str]) -> str:
  """The letter of the right choice from an index (MMLU), a label (ARC: "B" or "2") or a letter."""
  if isinstance(answer, bool) or not isinstance(answer, (int, str)):
    raise RowError(f"a multiple-choice answer must be an index or a label; got {answer!r:.80}")
  if isinstance(answer, int):
    if not 0 <= answer < len(labels):
      raise RowError(f"answer index {answer} is out of range for {len(labels)} choices")
    return string.ascii_uppercase[answer]
  if answer.strip() in labels:
    return string.ascii_uppercase[labels.index(answer.strip())]
  if len(answer.strip()) == 1 and answer.strip().upper() in string.ascii_uppercase[:len(labels)]:
    return answer.strip().upper()
  raise RowError(f"answer {answer!r:.40} is not one of the choice labels {labels}")


def _answer(value: Any, extract: str) -> str | list[str]:
  if isinstance(value, (list, tuple)):
    if not all(isinstance(v, str) for v in value):
      raise RowError(f"a list answer must hold strings; got {value!r:.80}")
    return list(value)
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise RowError(f"answer must be a string or number; got {type(value).__name__}")
  text = str(value)
  if extract == "gsm8k":
    if "####" not in text:
      raise RowError("answer_extract='gsm8k' needs '#### <answer>' at the end of the answer field")
    text = text.rsplit("####", 1)[1].strip().replace(",", "")
  elif extract == "boxed":
    boxed = last_boxed(text)
    if boxed is None:
      raise RowError("answer_extract='boxed' needs a \\boxed{...} in the answer field")
    text = boxed
  if not text.strip():
    raise RowError("answer is empty")
  return text.strip()


def _tests(value: Any) -> str | dict:
  if isinstance(value, str):
    try:
      decoded = json.loads(value)
    except json.JSONDecodeError:
      return value  # Python asserts
    value = decoded
  if isinstance(value, list) and all(isinstance(v, str) for v in value):
    return "\n".join(value)  # MBPP's test_list
  if isinstance(value, Mapping):
    if not {"inputs", "outputs"} <= set(value) or len(value["inputs"]) != len(value["outputs"]):
      raise RowError("tests must hold 'inputs' and 'outputs' lists of the same length")
    return {key: value[key] for key in ("inputs", "outputs", "fn_name") if key in value and value[key]}
  raise RowError(f"tests must be Python asserts, a list of them, or {{'inputs', 'outputs'}}; got {value!r:.80}")


def normalize_row(row: Mapping[str, Any], fields: Mapping[str, str], answer_extract: str = "none") -> dict:
  """The canonical example of one raw row. Raises RowError naming the problem."""
  if not isinstance(row, Mapping):
    raise RowError(f"a row must be a JSON object; got {type(row).__name__}")
  raw = {name: lookup(row, path) for name, path in fields.items() if name != "domain"}
  raw = {name: value for name, value in raw.items() if not _empty(value)}
  if isinstance(raw.get("answer"), (list, tuple)) and len(raw["answer"]) == 1:
    raw["answer"] = raw["answer"][0]  # one accepted answer, stored as a list (TFDS, some exports)
  if not isinstance(raw.get("prompt"), str):
    raise RowError(f"prompt ({fields['prompt']!r}) must be a non-empty string")
  example: dict[str, Any] = {"prompt": raw["prompt"]}
  if "tests" in raw:
    example["tests"] = _tests(raw["tests"])
  if "entry_point" in raw:
    example["entry_point"] = str(raw["entry_point"])
  if "choices" in raw:
    example["choices"], labels = _choices(raw["choices"])
    if "answer" not in raw:
      raise RowError(f"a multiple-choice row needs an answer ({fields.get('answer')!r})")
    example["answer"] = _choice_letter(raw["answer"], labels)
  elif "answer" in raw:
    example["answer"] = _answer(raw["answer"], answer_extract)
  elif "tests" not in raw:
    raise RowError(f"the row has neither an answer ({fields.get('answer')!r}) nor tests ({fields.get('tests')!r})")
  return example
