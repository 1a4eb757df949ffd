"""Per-domain held-out evaluation: pass@1 (greedy) and mean@k (k samples at the rollout temperature).

The eval set is the first `prompts_per_domain` examples of each domain's held-out split, the same
at every evaluation, so numbers are comparable across steps and runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from etils import epath

from mcpo_jax.data.domains import Domain
from mcpo_jax.data.sources import open_source
from mcpo_jax.data.tokenize import encode_prompt, left_pad, render_messages
from mcpo_jax.mesh import to_host
from mcpo_jax.model.transformer import Transformer
from mcpo_jax.rewards import RewardPool
from mcpo_jax.sampling import generate


@dataclass(frozen=True)
class EvalSet:
  prompt_ids: np.ndarray  # [M, P] int32, left-padded, all domains
  prompt_mask: np.ndarray  # [M, P] int32
  examples: list[dict]  # [M] with "domain", "verifier", "answer_format"


def build_eval_set(domains: Sequence[Domain], tokenizer, *, prompts_per_domain: int, split: str,
                   max_prompt_tokens: int) -> EvalSet:
  rows, examples = [], []
  for domain in domains:
    source = open_source(domain.source, split, domain.name, f"domain {domain.name!r} source")
    taken = 0
    for index in range(len(source)):
      if taken == prompts_per_domain:
        break
      example = {**source[index], "domain": domain.name, "verifier": domain.verifier,
                 "answer_format": domain.answer_format, "split": split, "index": index}
      tokens = encode_prompt(tokenizer, render_messages(domain, example))
      if len(tokens) <= max_prompt_tokens:
        rows.append(tokens)
        examples.append(example)
        taken += 1
  ids, mask = left_pad(rows, tokenizer.pad_token_id)
  return EvalSet(ids, mask, examples)


def _decode(tokenizer, rollouts) -> list[str]:
  tokens, mask = to_host(rollouts.tokens), to_host(rollouts.response_mask).astype(bool)
  return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(tokens, mask)]


def evaluate(model: Transformer, tokenizer, eval_set: EvalSet, pool: RewardPool, *, max_new_tokens: int,
             k: int, temperature: float, stop_token_ids: Sequence[int], key: jax.Array, batch_size: int = 64
             ) -> dict[str, float]:
  """{"eval/<domain>/pass@1": ..., "eval/<domain>/mean@k": ..., "eval/mean/pass@1": ...}."""
  names = [example["domain"] for example in eval_set.examples]
  results: dict[str, list[np.ndarray]] = {"pass@1": [], f"mean@{k}": []}
  for start in range(0, len(names), batch_size):
    ids = eval_set.prompt_ids[start:start + batch_size]
    mask = eval_set.prompt_mask[start:start + batch_size]
    examples = eval_set.examples[start:start + batch_size]
    for metric, group, temp in (("pass@1", 1, 0.0), (f"mean@{k}", k, temperature)):
      if metric != "pass@1" and k <= 0:
        continue
      rollouts = generate(model, ids, mask, group_size=group, max_new_tokens=max_new_tokens, temperature=temp,
                          stop_token_ids=stop_token_ids, key=key, step=start, pad_id=tokenizer.pad_token_id)
      repeated = [example for example in examples for _ in range(group)]
      scored = pool.score(_decode(tokenizer, rollouts), repeated, [e["verifier"] for e in repeated])
      results[metric].append(scored.correct.reshape(-1, group).mean(axis=1))  # [prompts]
  summary: dict[str, float] = {}
  for metric, parts in results.items():
    if not parts:
      continue
    per_prompt = np.concatenate(parts)
    for domain in dict.fromkeys(names):
      summary[f"eval/{domain}/{metric}"] = float(per_prompt[[n == domain for n in names]].mean())
    domain_means = [summary[f"eval/{d}/{metric}"] for d in dict.fromkeys(names)]
    summary[f"eval/mean/{metric}"] = float(np.mean(domain_means))  # each domain weighs the same
  return summary


def format_table(rows: dict[str, dict[str, float]], metric: str = "pass@1") -> str:
  """A Markdown table: one column per labelled evaluation (e.g. "start", "end"), one row per domain."""
  labels = list(rows)
  domains = sorted({key.split("/")[1] for r in rows.values() for key in r if key.endswith(metric)} - {"mean"})
  lines = [f"| domain ({metric}) | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
  for domain in domains + ["mean"]:
    cells = [f"{rows[label].get(f'eval/{domain}/{metric}', float('nan')):.3f}" for label in labels]
    lines.append(f"| {domain} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_eval(workdir: str, step: int, summary: dict[str, float]) -> None:
  if jax.process_index() != 0:
    return
  directory = epath.Path(workdir) / "eval"
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"step_{step:06d}.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
