"""A domain: where its examples come from, how they are asked (system prompt + answer-format
instruction), which verifier judges them, and its share of every batch. A domain of weight 0 is
evaluated but never trained on: train on one format, measure the others (a transfer probe).

Domains come from config as a mapping {name: settings} (a ConfigDict, so each field can be overridden
by flag: `--config.data.domains.arithmetic.weight=2`; ConfigDict sorts names, and so do we) or as a
list of settings with a "name". The domain id of a row is the domain's position in that order.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Sequence

from mcpo_jax.data.errors import DataError
from mcpo_jax.data.sources import check_source_spec
from mcpo_jax.rewards import FORMATS, UnknownVerifierError, check_name


@dataclasses.dataclass(frozen=True)
class Domain:
  name: str
  source: Mapping[str, Any]        # {"kind": "reasoning_gym" | "jsonl" | "parquet" | "tfds", ...}; see sources.py
  verifier: str                    # a name in mcpo_jax.rewards.VERIFIERS
  weight: float = 1.0              # share of every batch, relative to the other domains; 0: evaluated, never trained
  answer_format: str = "answer_tag"  # a name in mcpo_jax.rewards.FORMATS
  system_prompt: str = ""          # empty: the chat template's default system message
  instruction: str = ""            # empty: the answer format's instruction

  @property
  def prompt_instruction(self) -> str:
    return self.instruction or FORMATS[self.answer_format].instruction


DOMAIN_FIELDS = tuple(field.name for field in dataclasses.fields(Domain))


def _plain(value: Any) -> Any:
  """ConfigDicts (and FrozenConfigDicts) as dicts, so the rest of the pipeline sees plain data."""
  return value.to_dict() if hasattr(value, "to_dict") else value


def parse_domain(settings: Mapping[str, Any], where: str) -> Domain:
  """One Domain from its settings; `where` (e.g. "config.data.domains.math") prefixes every error."""
  settings = dict(_plain(settings))
  for key in settings:
    if key not in DOMAIN_FIELDS:
      close = difflib.get_close_matches(key, DOMAIN_FIELDS, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise DataError(f"{where}.{key} is not a domain setting{hint}; allowed: {', '.join(DOMAIN_FIELDS)}.")
  for key in ("name", "source", "verifier"):
    if not settings.get(key):
      raise DataError(f"{where}.{key} is missing; a domain needs name, source and verifier.")
  try:
    check_name(settings["verifier"])
  except UnknownVerifierError as error:
    raise DataError(f"{where}.verifier: {error}") from None
  if settings.get("answer_format", "answer_tag") not in FORMATS:
    raise DataError(f"{where}.answer_format={settings['answer_format']!r}; choose one of {list(FORMATS)}.")
  weight = settings.get("weight", 1.0)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
    raise DataError(f"{where}.weight={weight!r}; use a positive number, or 0 to evaluate the domain without "
                    "training on it (remove the domain to leave it out).")
  settings["source"] = check_source_spec(_plain(settings["source"]), f"{where}.source")
  return Domain(**settings)


def parse_domains(config: Mapping[str, Mapping] | Sequence[Mapping],
                  where: str = "config.data.domains") -> list[Domain]:
  """Domains from {name: settings} (sorted by name) or [settings with "name"] (in order)."""
  config = _plain(config)
  if isinstance(config, Mapping):
    entries = []
    for name in sorted(config):
      settings = dict(_plain(config[name]))
      if settings.setdefault("name", name) != name:
        raise DataError(f"{where}.{name}.name={settings['name']!r}; in a mapping the key is the name, drop 'name'.")
      entries.append((f"{where}.{name}", settings))
  elif isinstance(config, (list, tuple)):
    entries = [(f"{where}[{index}]", settings) for index, settings in enumerate(config)]
  else:
    raise DataError(f"{where} must be a mapping {{name: settings}} or a list of settings; got {type(config).__name__}.")
  if not entries:
    raise DataError(f"{where} is empty; give at least one domain (see mcpo_jax.data.default_domains()).")
  domains = [parse_domain(settings, label) for label, settings in entries]
  names = [domain.name for domain in domains]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise DataError(f"{where} names {duplicates} more than once; domain names must be unique.")
  if not any(domain.weight > 0 for domain in domains):
    raise DataError(f"{where}: every domain has weight 0, so there is nothing to train on; give one a positive weight.")
  return domains


def domain_id(domains: Sequence[Domain], name: str) -> int:
  """The id (position) of the domain called `name`; an unknown name is an error listing the known ones."""
  for index, domain in enumerate(domains):
    if domain.name == name:
      return index
  raise DataError(f"unknown domain {name!r}; known domains: {', '.join(d.name for d in domains)}.")


def _gym(dataset: str, **config: Any) -> dict:
  return {"kind": "reasoning_gym", "dataset": dataset, "config": config}


def default_domains() -> dict[str, dict]:
  """Three offline reasoning-gym domains of different kinds, easy enough that SmolLM2-135M-Instruct
  is right some of the time, so GRPO groups have reward variance:
  - arithmetic: sum or difference of two 1-digit numbers (basic_arithmetic);
  - logic: does a conclusion follow from two premises, Yes/No (syllogism);
  - gcd: greatest common divisor of two numbers in [2, 20] (gcd).
  Measured with the embedded model (temperature 1, 16 prompts x 8 samples, 64 new tokens): right
  7% / 6% / 2% of the time, with variance in 38% / 44% / 12% of the groups. Spelling a 3-letter
  word backward and sorting 3 numbers or words scored 0%. Such easy generators have few distinct
  problems (arithmetic: 242); hashing them into splits leaves 19 / 27 validation / test problems
  (gcd 39 / 34, logic ~2000 each), so an eval of more prompts per domain needs the `transfer` task.
  """
  return {
      "arithmetic": {"source": _gym("basic_arithmetic", min_terms=2, max_terms=2, min_digits=1, max_digits=1,
                                    operators=["+", "-"], allow_parentheses=False, allow_negation=False),
                     "verifier": "gym", "weight": 1.0},
      "gcd": {"source": _gym("gcd", min_numbers=2, max_numbers=2, min_value=2, max_value=20), "verifier": "gym",
              "weight": 1.0},
      "logic": {"source": _gym("syllogism"), "verifier": "gym", "weight": 1.0},
  }
