"""Where a domain's examples come from: reasoning-gym generators, JSONL / Parquet files, TFDS.

Every source is a random-access sequence of canonical examples (`records.py`) for one split.
reasoning-gym generator item i is drawn from Random(seed + i), so the splits get disjoint seed ranges
(train from `seed`, validation from `seed + 2**40`, test from `seed + 2**41`). Note that easy
generators have few distinct problems, so equal questions can still occur in two splits.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

from etils import epath

from mcpo_jax.data.errors import DataError
from mcpo_jax.data.records import ANSWER_EXTRACTORS, CANONICAL_FIELDS, RowError, lookup, normalize_row

SPLITS = ("train", "validation", "test")
SEED_STRIDE = 2**40
SKIP_HINT = "fix the row, or set skip_bad_rows=True in the source to skip and count such rows"

# kind -> (required keys, optional keys with defaults)
SOURCE_KEYS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "reasoning_gym": (("dataset",), {"config": {}, "seed": 0, "size": 100_000}),
    "jsonl": (("path", "fields"), {"answer_extract": "none", "skip_bad_rows": False, "domain_value": ""}),
    "parquet": (("path", "fields"), {"answer_extract": "none", "skip_bad_rows": False, "domain_value": ""}),
    "tfds": (("name",), {"data_dir": "", "fields": {}, "answer_extract": "none", "skip_bad_rows": False,
                         "domain_value": ""}),
}


class Source(Protocol):
  skipped_rows: int

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...


def _close(value: str, known: Sequence[str]) -> str:
  match = difflib.get_close_matches(str(value), list(known), n=1)
  return f" (did you mean {match[0]!r}?)" if match else ""


def check_source_spec(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The spec with defaults filled in; raises DataError naming `where` and the allowed keys."""
  spec = dict(spec)
  kind = spec.pop("kind", None)
  if kind not in SOURCE_KEYS:
    raise DataError(f"{where}.kind={kind!r}{_close(kind, SOURCE_KEYS)}; choose one of {list(SOURCE_KEYS)}.")
  required, optional = SOURCE_KEYS[kind]
  for key in spec:
    if key not in required and key not in optional:
      raise DataError(f"{where}.{key} is not a {kind} source setting{_close(key, [*required, *optional])}; "
                      f"allowed: {', '.join([*required, *optional])}.")
  for key in required:
    if key not in spec:
      raise DataError(f"{where}.{key} is missing; a {kind} source needs {', '.join(required)}.")
  spec = {"kind": kind, **optional, **spec}
  if kind != "reasoning_gym":
    unknown = [name for name in spec["fields"] if name not in CANONICAL_FIELDS]
    if unknown:
      raise DataError(f"{where}.fields has {unknown}, which are not example fields; "
                      f"map any of {list(CANONICAL_FIELDS)} to the file's field names.")
    if spec["answer_extract"] not in ANSWER_EXTRACTORS:
      raise DataError(f"{where}.answer_extract={spec['answer_extract']!r}; choose one of {list(ANSWER_EXTRACTORS)}.")
  if kind in ("jsonl", "parquet") and "prompt" not in spec["fields"]:
    raise DataError(f"{where}.fields must map 'prompt' to the file's question field, e.g. {{'prompt': 'question'}}.")
  return spec


@dataclass
class ListSource:
  """Examples held in memory (files are read whole: RL prompt sets are small)."""
  examples: list[dict]
  skipped_rows: int = 0

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> dict:
    return self.examples[index]


@dataclass
class GymSource:
  """reasoning-gym items generated on demand: deterministic in (seed, index)."""
  dataset: str
  config: dict
  seed: int
  size: int
  skipped_rows: int = 0
  _generator: Any = field(default=None, repr=False)

  def __post_init__(self):
    import reasoning_gym
    from reasoning_gym.factory import DATASETS
    if self.dataset not in DATASETS:
      raise DataError(f"reasoning-gym has no dataset {self.dataset!r}{_close(self.dataset, DATASETS)}; "
                      f"known: {', '.join(sorted(DATASETS))}.")
    settings = DATASETS[self.dataset][1].__dataclass_fields__
    unknown = [key for key in self.config if key not in settings]
    if unknown:
      raise DataError(f"reasoning-gym {self.dataset} has no settings {unknown}; its settings: "
                      f"{', '.join(k for k in settings if k not in ('seed', 'size'))}.")
    try:
      self._generator = reasoning_gym.create_dataset(self.dataset, seed=self.seed, size=self.size, **self.config)
    except (AssertionError, ValueError, TypeError) as error:
      raise DataError(f"reasoning-gym {self.dataset} rejected config {self.config}: {error}") from error

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    entry = self._generator[index]
    return {"prompt": entry["question"], "answer": entry["answer"], "gym_dataset": self.dataset,
            "gym_config": self.config, "metadata": entry["metadata"]}


def split_path(path: str | Mapping[str, str], split: str, where: str) -> str:
  """A split's file: from a {split: path} mapping, a path with "{split}", or a plain path (train only)."""
  if isinstance(path, Mapping):
    if split not in path:
      raise DataError(f"{where}.path has no {split!r} file; it has {sorted(path)}.")
    return path[split]
  if "{split}" in path:
    return path.replace("{split}", split)
  if split != "train":
    raise DataError(f"{where}.path={path!r} is a single file, used for 'train' only; for the {split!r} split "
                    "give {'train': ..., '" + split + "': ...} or a path containing '{split}'.")
  return path


def read_rows(path: str, kind: str) -> Iterator[tuple[int, Any]]:
  """(line or row number, parsed row or the RowError of an unparsable line)."""
  file = epath.Path(path)
  if not file.exists():
    raise DataError(f"{path}: no such file; check the source's path.")
  if kind == "jsonl":
    with file.open("r") as handle:
      for number, line in enumerate(handle, start=1):
        if not line.strip():
          continue
        try:
          yield number, json.loads(line)
        except json.JSONDecodeError as error:
          yield number, RowError(f"not valid JSON ({error.msg} at column {error.colno})")
  else:
    import pyarrow.parquet as pq
    with file.open("rb") as handle:
      for number, row in enumerate(pq.read_table(handle).to_pylist(), start=1):
        yield number, row


def load_rows(rows: Iterator[tuple[int, Any]], location: str, unit: str, fields: Mapping[str, str],
              answer_extract: str, skip_bad_rows: bool, domain_value: str) -> ListSource:
  """Canonical examples of the rows whose domain field (if mapped) equals `domain_value`.

  Errors read "<location>:<number>: <problem>", the number counting `unit`s (lines, rows, records).
  """
  examples, skipped = [], 0
  for number, row in rows:
    try:
      if isinstance(row, RowError):
        raise row
      if "domain" in fields and str(lookup(row, fields["domain"])) != domain_value:
        continue
      examples.append(normalize_row(row, fields, answer_extract))
    except RowError as error:
      if not skip_bad_rows:
        raise DataError(f"{location}:{number}: {error}; {SKIP_HINT}.") from None
      skipped += 1
  if not examples:
    raise DataError(f"{location}: no usable {unit}s ({skipped} skipped); check the file and the field map.")
  return ListSource(examples, skipped)


def open_source(spec: Mapping[str, Any], split: str, domain: str, where: str = "source") -> Source:
  """The `split` of the source `spec` (as checked by check_source_spec) of domain `domain`."""
  if split not in SPLITS:
    raise DataError(f"split {split!r} is not one of {list(SPLITS)}.")
  spec = check_source_spec(spec, where)
  kind = spec["kind"]
  if kind == "reasoning_gym":
    if not 0 < spec["size"] <= SEED_STRIDE:
      raise DataError(f"{where}.size={spec['size']}; it must be in [1, 2**40] so that splits keep disjoint seeds.")
    return GymSource(spec["dataset"], dict(spec["config"]), spec["seed"] + SPLITS.index(split) * SEED_STRIDE,
                     spec["size"])
  options = dict(answer_extract=spec["answer_extract"], skip_bad_rows=spec["skip_bad_rows"],
                 domain_value=spec["domain_value"] or domain)
  if kind == "tfds":
    from mcpo_jax.data.tfds_source import PREPARED_FIELDS, read_tfds
    return load_rows(read_tfds(spec["name"], split, spec["data_dir"]), f"tfds:{spec['name']}/{split}", "record",
                     dict(spec["fields"]) or PREPARED_FIELDS, **options)
  path = split_path(spec["path"], split, where)
  return load_rows(read_rows(path, kind), path, "line" if kind == "jsonl" else "row", dict(spec["fields"]),
                   **options)
