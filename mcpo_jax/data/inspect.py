"""Per domain and split: how many distinct problems, and how many each pair of splits shares.

    python -m mcpo_jax.data.inspect --config=configs/multi_domain.py[:preset] [--max_items=20000]

A split is read up to `max_items` items (a generator's train split is endless in effect); problems are
counted by content (`splits.content_key`). Every overlap should be 0.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from absl import app, flags

from mcpo_jax.data.domains import Domain, parse_domains
from mcpo_jax.data.sources import open_source
from mcpo_jax.data.splits import SPLITS, content_key
from mcpo_jax.flag_errors import define_config, parse_flags


def split_keys(domain: Domain, max_items: int) -> dict[str, tuple[int, set[str]]]:
  """{split: (items read, distinct content keys)} of one domain."""
  result = {}
  for split in SPLITS:
    source = open_source(domain.source, split, domain.name, f"domain {domain.name!r} source")
    count = min(len(source), max_items)
    result[split] = count, {content_key(source[index]["prompt"]) for index in range(count)}
  return result


def overlaps(keys: dict[str, tuple[int, set[str]]]) -> dict[tuple[str, str], int]:
  """{(split a, split b): problems in both}, for each pair of splits."""
  return {(a, b): len(keys[a][1] & keys[b][1]) for a, b in itertools.combinations(SPLITS, 2)}


def report(domains: Sequence[Domain], max_items: int) -> tuple[str, int]:
  """(a Markdown table, the total overlap over all domains and split pairs)."""
  pairs = list(itertools.combinations(SPLITS, 2))
  lines = ["| domain | " + " | ".join(f"{s} (read / distinct)" for s in SPLITS) + " | "
           + " | ".join(f"{a} & {b}" for a, b in pairs) + " |", "|---" * (1 + len(SPLITS) + len(pairs)) + "|"]
  total = 0
  for domain in domains:
    keys = split_keys(domain, max_items)
    shared = overlaps(keys)
    total += sum(shared.values())
    lines.append(f"| {domain.name} | " + " | ".join(f"{keys[s][0]} / {len(keys[s][1])}" for s in SPLITS) + " | "
                 + " | ".join(str(shared[pair]) for pair in pairs) + " |")
  return "\n".join(lines), total


def main(argv: Sequence[str]) -> None:
  del argv
  from mcpo_jax.console import quiet_libraries
  quiet_libraries()
  table, total = report(parse_domains(_CONFIG.value.data.domains), _MAX_ITEMS.value)
  print(table)
  print(f"overlap between splits: {total} problems" + ("" if total == 0 else " (the splits leak)"))


if __name__ == "__main__":  # flags only when run as a program, so that importing defines none
  _CONFIG = define_config(None, "Run config, e.g. configs/multi_domain.py:transfer.")
  _MAX_ITEMS = flags.DEFINE_integer("max_items", 20_000, "Items read per split at most.")
  app.run(main, flags_parser=parse_flags)
