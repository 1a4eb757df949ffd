"""TensorFlow Datasets: prepare dataset files as an array_record TFDS dataset, and read any prepared
TFDS dataset back through `tfds.data_source` (random-access array_record reads, no TensorFlow).

A prepared dataset stores canonical examples (`records.py`) in plain features, so reading it back
needs no field map: prompt (text), answer (texts: none, one, or several accepted), choices (texts),
tests (text: asserts, or the JSON of {"inputs", "outputs"}), entry_point (text). The files are checked
row by row while preparing, with the same errors as a JSONL/Parquet source.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping

import numpy as np
from etils import epath

from mcpo_jax.data.errors import DataError
from mcpo_jax.data.sources import load_rows, read_rows

PREPARED_FIELDS = {"prompt": "prompt", "answer": "answer", "choices": "choices", "tests": "tests",
                   "entry_point": "entry_point"}


def _features():
  import tensorflow_datasets as tfds
  text, texts = tfds.features.Text(), tfds.features.Sequence(tfds.features.Text())
  return tfds.features.FeaturesDict({"prompt": text, "answer": texts, "choices": texts, "tests": text,
                                     "entry_point": text})


def _record(example: dict) -> dict:
  answer = example.get("answer")
  tests = example.get("tests", "")
  return {"prompt": example["prompt"],
          "answer": [] if answer is None else [answer] if isinstance(answer, str) else list(answer),
          "choices": example.get("choices", []),
          "tests": tests if isinstance(tests, str) else json.dumps(tests),
          "entry_point": example.get("entry_point", "")}


def prepare_tfds(name: str, files: Mapping[str, str], data_dir: str, *, fields: Mapping[str, str],
                 answer_extract: str = "none", skip_bad_rows: bool = False, version: str = "1.0.0") -> epath.Path:
  """Writes `files` ({split: .jsonl or .parquet path}) as TFDS dataset `name` under `data_dir`.

  Returns the dataset's directory. A source then reads it as {"kind": "tfds", "name": name,
  "data_dir": data_dir}.
  """
  import tensorflow_datasets as tfds

  if "domain" in fields:
    raise DataError("prepare_tfds stores one domain's examples: remove 'domain' from fields and prepare one "
                    "dataset per domain.")
  splits = {}
  for split, path in files.items():
    kind = "parquet" if str(path).endswith(".parquet") else "jsonl"
    splits[split] = load_rows(read_rows(str(path), kind), str(path), "line" if kind == "jsonl" else "row",
                              fields, answer_extract, skip_bad_rows, domain_value="").examples

  def info(builder):
    return tfds.core.DatasetInfo(builder=builder, features=_features(),
                                 description="Canonical mcpo_jax examples (prompt, answer, choices, tests).")

  def split_generators(builder, dl_manager):
    return {split: builder._generate_examples(split) for split in splits}

  def generate_examples(builder, split):
    for index, example in enumerate(splits[split]):
      yield index, _record(example)

  builder_class = type(name, (tfds.core.GeneratorBasedBuilder,),
                       {"name": name, "VERSION": tfds.core.Version(version), "_info": info,
                        "_split_generators": split_generators, "_generate_examples": generate_examples},
                       skip_registration=True)
  builder = builder_class(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.data_path


def _plain(value: Any) -> Any:
  """TFDS numpy values (bytes, arrays, scalars) as plain Python (str, list, int/float)."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [_plain(item) for item in value.tolist()] if value.ndim else _plain(value.item())
  if isinstance(value, (list, tuple)):
    return [_plain(item) for item in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, Mapping):
    return {key: _plain(item) for key, item in value.items()}
  return value


def read_tfds(name: str, split: str, data_dir: str) -> Iterator[tuple[int, dict]]:
  """(record number from 1, record as plain Python) of a prepared TFDS dataset's split."""
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as error:  # noqa: BLE001 - TFDS raises several types for a missing dataset or split
    raise DataError(f"tfds:{name}/{split} cannot be read from data_dir={data_dir or '(TFDS default)'}: {error}. "
                    "Check name, split and data_dir, or create it with mcpo_jax.data.prepare_tfds.") from error
  for index in range(len(source)):
    yield index + 1, _plain(source[index])
