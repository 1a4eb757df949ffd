"""Training prompt batches: mixed by domain weight, chat-templated, endless, resumable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from mcpo_jax.data.domains import Domain
from mcpo_jax.data.errors import DataError
from mcpo_jax.data.mixing import batch_counts, example_index
from mcpo_jax.data.sources import Source, open_source
from mcpo_jax.data.tokenize import encode_prompt, left_pad, render_messages

STATE_VERSION = 1


@dataclass(frozen=True)
class PromptBatch:
  prompt_tokens: np.ndarray   # [B, P] int32, left-padded
  prompt_mask: np.ndarray  # [B, P] int32, 1 on prompt tokens
  domain_id: np.ndarray    # [B] int32, position of the row's domain in the domain list
  prompt_id: np.ndarray    # [B] int32, the row number: rows of one prompt share it once expanded to B·G
  examples: list[dict]     # [B] the verifier's reference plus domain, verifier, answer_format, split, index

  @property
  def verifier_names(self) -> list[str]:
    return [example["verifier"] for example in self.examples]


def _tagged(example: dict, domain: Domain, split: str, index: int) -> dict:
  return {**example, "domain": domain.name, "verifier": domain.verifier, "answer_format": domain.answer_format,
          "split": split, "index": index}


def _batch(rows: list[tuple[int, list[int], dict]], pad_id: int) -> PromptBatch:
  """rows: (domain id, token ids, tagged example)."""
  ids, mask = left_pad([tokens for _, tokens, _ in rows], pad_id)
  return PromptBatch(ids, mask, np.array([d for d, _, _ in rows], np.int32), np.arange(len(rows), dtype=np.int32),
                     [example for _, _, example in rows])


class PromptIterator:
  """Endless training batches of `batch_size` prompts mixed by domain weight, deterministic in `seed`.

  A prompt longer than `max_prompt_tokens` is skipped, counted in `stats()`, and replaced by the
  domain's next example. `get_state()` is a small JSON-able dict; `set_state()` on a fresh iterator
  over the same domains makes it yield exactly the batches that would have followed.
  """

  def __init__(self, domains: Sequence[Domain], tokenizer, *, batch_size: int, seed: int, max_prompt_tokens: int,
               split: str = "train"):
    trained = sum(d.weight > 0 for d in domains)
    if batch_size < trained:
      raise DataError(f"batch_size={batch_size} is below the number of trained domains ({trained}); every batch "
                      "holds every domain of positive weight, so raise batch_size or drop domains.")
    if max_prompt_tokens < 1:
      raise DataError(f"max_prompt_tokens={max_prompt_tokens}; it must be positive.")
    self.domains, self.tokenizer, self.split = list(domains), tokenizer, split
    self.batch_size, self.seed, self.max_prompt_tokens = batch_size, seed, max_prompt_tokens
    self.sources: list[Source] = [open_source(d.source, split, d.name, f"domain {d.name!r} source") for d in domains]
    weights = np.array([d.weight for d in domains], np.float64)
    self.weights = weights / weights.sum()  # [D]
    self.batches = 0
    self.emitted = np.zeros(len(domains), np.int64)   # [D] rows given out
    self.drawn = np.zeros(len(domains), np.int64)     # [D] positions consumed, filtered ones included
    self.filtered = np.zeros(len(domains), np.int64)  # [D] prompts over max_prompt_tokens

  def __iter__(self) -> Iterator[PromptBatch]:
    return self

  def _next_row(self, domain_id: int) -> tuple[int, list[int], dict]:
    domain, source = self.domains[domain_id], self.sources[domain_id]
    for _ in range(len(source)):
      index = example_index(self.seed, domain.name, len(source), int(self.drawn[domain_id]))
      self.drawn[domain_id] += 1
      example = _tagged(source[index], domain, self.split, index)
      tokens = encode_prompt(self.tokenizer, render_messages(domain, example))
      if len(tokens) <= self.max_prompt_tokens:
        return domain_id, tokens, example
      self.filtered[domain_id] += 1
    raise DataError(f"domain {domain.name!r}: {len(source)} prompts in a row are longer than max_prompt_tokens="
                    f"{self.max_prompt_tokens}; raise it or shorten the prompts.")

  def __next__(self) -> PromptBatch:
    counts = batch_counts(self.weights, self.batch_size, self.emitted, self.batches)  # [D]
    rows = [self._next_row(domain_id) for domain_id, count in enumerate(counts) for _ in range(count)]
    self.emitted += counts
    self.batches += 1
    return _batch(rows, self.tokenizer.pad_token_id)

  def stats(self) -> dict[str, dict[str, int]]:
    """Per domain: prompts skipped for length, and bad file rows skipped when the sources were read."""
    names = [d.name for d in self.domains]
    return {"filtered_long": dict(zip(names, self.filtered.tolist())),
            "skipped_rows": {name: source.skipped_rows for name, source in zip(names, self.sources)}}

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "seed": self.seed, "split": self.split, "batch_size": self.batch_size,
            "domains": [d.name for d in self.domains], "batches": self.batches, "emitted": self.emitted.tolist(),
            "drawn": self.drawn.tolist(), "filtered": self.filtered.tolist()}

  def set_state(self, state: dict) -> None:
    expected = {key: value for key, value in self.get_state().items()
                if key in ("version", "seed", "split", "batch_size", "domains")}
    for key, value in expected.items():
      if state.get(key) != value:
        raise DataError(f"saved data state has {key}={state.get(key)!r} but this run has {value!r}; resume with "
                        "the data config the checkpoint was written with.")
    self.batches = int(state["batches"])
    self.emitted, self.drawn, self.filtered = (np.array(state[key], np.int64)
                                               for key in ("emitted", "drawn", "filtered"))

