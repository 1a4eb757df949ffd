"""Where a domain's examples come from: reasoning-gym generators, the generated addition task, JSONL /
Parquet files, TFDS.

Every source is a random-access sequence of canonical examples (`records.py`) for one split, and the
splits are disjoint by content (`splits.py`: the normalised question text):
- generators (reasoning-gym): a drawn problem belongs to the split its question hashes to. Train item
  i is the first of draws i·64 … i·64+63 that hashes to train (so random access stays O(1); train may
  repeat a problem). A held-out split is the distinct problems, in draw order, among its first
  `heldout_draws` draws that hash to it; a generator with few problems has few held-out ones.
- files (JSONL, Parquet, TFDS), one per split: a held-out split keeps each question once, and a
  question in the test file is dropped from validation and train, one in validation from train (the
  held-out sets stay as given; the dropped rows are counted in `overlap_rows` / `duplicate_rows`).
- addition (`transfer.py`): operand pairs are hashed, so no pair is in two splits in any format.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

from etils import epath

from mcpo_jax.data.errors import DataError
from mcpo_jax.data.records import ANSWER_EXTRACTORS, CANONICAL_FIELDS, RowError, lookup, normalize_row
from mcpo_jax.data.splits import DEFAULT_SHARES, SPLITS, check_shares, content_key, split_of
from mcpo_jax.data.transfer import AdditionSource

SEED_STRIDE = 2**40
TRAIN_ATTEMPTS = 64  # draws per train item; at a train share of 0.8, all 64 miss with probability 0.2**64
SKIP_HINT = "fix the row, or set skip_bad_rows=True in the source to skip and count such rows"

# kind -> (required keys, optional keys with defaults)
SOURCE_KEYS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "reasoning_gym": (("dataset",), {"config": {}, "seed": 0, "size": 100_000, "heldout_draws": 20_000,
                                     "split_shares": list(DEFAULT_SHARES)}),
    "addition": (("format",), {"low": 10, "high": 99, "second_low": -1, "second_high": -1,
                               "split_shares": list(DEFAULT_SHARES)}),
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
  if "split_shares" in spec:
    spec["split_shares"] = list(check_shares(spec["split_shares"], where))
  if kind in ("jsonl", "parquet", "tfds"):
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
  skipped_rows: int = 0    # unusable rows skipped (skip_bad_rows)
  overlap_rows: int = 0    # rows dropped because their question is in a later split (validation, test)
  duplicate_rows: int = 0  # held-out rows dropped because their question came earlier in the split

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, index: int) -> dict:
    return self.examples[index]


@dataclass
class GymSource:
  """The problems of one split of a reasoning-gym generator, made on demand: deterministic in
  (seed, split, index). `seed` is the split's draw stream."""
  dataset: str
  config: dict
  seed: int
  size: int
  split: str
  shares: tuple[float, float, float] = DEFAULT_SHARES
  heldout_draws: int = 20_000
  skipped_rows: int = 0
  _generator: Any = field(default=None, repr=False)
  _draws: list[int] = field(default_factory=list, repr=False)  # held-out: the draw of each distinct problem

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
    draws = max(self.size * TRAIN_ATTEMPTS, self.heldout_draws)
    try:
      self._generator = reasoning_gym.create_dataset(self.dataset, seed=self.seed, size=draws, **self.config)
    except (AssertionError, ValueError, TypeError) as error:
      raise DataError(f"reasoning-gym {self.dataset} rejected config {self.config}: {error}") from error
    if self.split != "train":
      seen: set[str] = set()
      for draw in range(self.heldout_draws):
        question = self._generator[draw]["question"]
        key = content_key(question)
        if key not in seen and split_of(question, self.shares) == self.split:
          seen.add(key)
          self._draws.append(draw)
          if len(self._draws) == self.size:
            break
      if not self._draws:
        raise DataError(f"reasoning-gym {self.dataset}: none of {self.heldout_draws} draws is a {self.split} "
                        "problem; widen the generator's config or raise heldout_draws.")

  def __len__(self) -> int:
    return self.size if self.split == "train" else len(self._draws)

  def _example(self, draw: int) -> dict:
    entry = self._generator[draw]
    return {"prompt": entry["question"], "answer": entry["answer"], "gym_dataset": self.dataset,
            "gym_config": self.config, "metadata": entry["metadata"]}

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} of a {len(self)}-item {self.split} split")
    if self.split != "train":
      return self._example(self._draws[index])
    for draw in range(index * TRAIN_ATTEMPTS, (index + 1) * TRAIN_ATTEMPTS):
      example = self._example(draw)
      if split_of(example["prompt"], self.shares) == "train":
        return example
    raise DataError(f"reasoning-gym {self.dataset}: {TRAIN_ATTEMPTS} draws in a row are held-out problems; the "
                    "generator has too few distinct problems for a train split: widen its config.")


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


def _read_split(spec: Mapping[str, Any], split: str, domain: str, where: str) -> ListSource:
  """A file source's split as the file holds it."""
  options = dict(answer_extract=spec["answer_extract"], skip_bad_rows=spec["skip_bad_rows"],
                 domain_value=spec["domain_value"] or domain)
  if spec["kind"] == "tfds":
    from mcpo_jax.data.tfds_source import PREPARED_FIELDS, read_tfds
    return load_rows(read_tfds(spec["name"], split, spec["data_dir"]), f"tfds:{spec['name']}/{split}", "record",
                     dict(spec["fields"]) or PREPARED_FIELDS, **options)
  path = split_path(spec["path"], split, where)
  return load_rows(read_rows(path, spec["kind"]), path, "line" if spec["kind"] == "jsonl" else "row",
                   dict(spec["fields"]), **options)


def _configured(spec: Mapping[str, Any], split: str) -> bool:
  """Does a file source have a `split` to read (a mapping entry, or a "{split}" path whose file exists)?"""
  if spec["kind"] == "tfds":
    return True
  path = spec["path"]
  if isinstance(path, Mapping):
    return split in path
  return "{split}" in path and epath.Path(path.replace("{split}", split)).exists()


def _later_keys(spec: Mapping[str, Any], split: str, domain: str, where: str) -> set[str]:
  """The questions of the splits after `split` (train < validation < test), which `split` must not hold."""
  keys: set[str] = set()
  for later in SPLITS[SPLITS.index(split) + 1:]:
    if not _configured(spec, later):
      continue
    try:
      keys |= {content_key(example["prompt"]) for example in _read_split(spec, later, domain, where)}
    except DataError:
      if spec["kind"] != "tfds":
        raise
      # a prepared TFDS dataset without this split: nothing to keep out
  return keys


def _disjoint(source: ListSource, later: set[str], deduplicate: bool, location: str) -> ListSource:
  """`source` without the questions of later splits and, for a held-out split, without repeats."""
  kept, seen, overlap, duplicate = [], set(), 0, 0
  for example in source.examples:
    key = content_key(example["prompt"])
    if key in later:
      overlap += 1
    elif deduplicate and key in seen:
      duplicate += 1
    else:
      seen.add(key)
      kept.append(example)
  if not kept:
    raise DataError(f"{location}: all {len(source)} rows also occur in a later split (validation or test) or "
                    "repeat; give this split its own questions.")
  return ListSource(kept, source.skipped_rows, overlap, duplicate)


def open_source(spec: Mapping[str, Any], split: str, domain: str, where: str = "source") -> Source:
  """The `split` of the source `spec` (as checked by check_source_spec) of domain `domain`."""
  if split not in SPLITS:
    raise DataError(f"split {split!r} is not one of {list(SPLITS)}.")
  spec = check_source_spec(spec, where)
  kind = spec["kind"]
  if kind == "reasoning_gym":
    if not 0 < spec["size"] <= SEED_STRIDE // TRAIN_ATTEMPTS:
      raise DataError(f"{where}.size={spec['size']}; it must be in [1, 2**34] so that splits keep disjoint draws.")
    if spec["heldout_draws"] < 1:
      raise DataError(f"{where}.heldout_draws={spec['heldout_draws']}; it must be positive.")
    return GymSource(spec["dataset"], dict(spec["config"]), spec["seed"] + SPLITS.index(split) * SEED_STRIDE,
                     spec["size"], split, tuple(spec["split_shares"]), spec["heldout_draws"])
  if kind == "addition":
    second = (spec["second_low"], spec["second_high"])
    return AdditionSource(spec["format"], spec["low"], spec["high"], split, tuple(spec["split_shares"]),
                          None if second == (-1, -1) else second, where)
  source = _read_split(spec, split, domain, where)
  location = f"{where} ({split} split)"
  return _disjoint(source, _later_keys(spec, split, domain, where), deduplicate=split != "train", location=location)
