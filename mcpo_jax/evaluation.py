"""Per-domain held-out evaluation: pass@1 (greedy) and mean@k (k samples at the rollout temperature),
with what it takes to recognise a collapsed policy (the constant-answer baseline, the share of the most
common answer) and per-prompt records for paired statistics.

The eval set is the first `prompts_per_domain` examples of each domain's held-out split, the same
at every evaluation, so numbers are comparable across steps and runs.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from etils import epath

from mcpo_jax.data.domains import Domain
from mcpo_jax.data.errors import DataError
from mcpo_jax.data.sources import open_source
from mcpo_jax.data.splits import content_key
from mcpo_jax.data.tokenize import encode_prompt, left_pad, render_messages
from mcpo_jax.mesh import to_host
from mcpo_jax.model.transformer import Transformer
from mcpo_jax.rewards import RewardPool, score_held_rows
from mcpo_jax.rewards.choice import chosen_letter
from mcpo_jax.rewards.exact import normalize
from mcpo_jax.rewards.extract import final_answer
from mcpo_jax.sampling import DecodePlan, generate


@dataclass(frozen=True)
class EvalSet:
  prompt_tokens: np.ndarray  # [M, P] int32, left-padded, all domains
  prompt_mask: np.ndarray  # [M, P] int32
  examples: list[dict]  # [M] with "domain", "verifier", "answer_format"


def build_eval_set(domains: Sequence[Domain], tokenizer, *, prompts_per_domain: int, split: str,
                   max_prompt_tokens: int) -> EvalSet:
  """The first `prompts_per_domain` distinct problems of each domain's `split` that fit `max_prompt_tokens`;
  a domain with fewer is a DataError (at start-up, not after training)."""
  rows, examples = [], []
  for domain in domains:
    source = open_source(domain.source, split, domain.name, f"domain {domain.name!r} source")
    taken, seen = 0, set()
    for index in range(len(source)):
      if taken == prompts_per_domain:
        break
      example = {**source[index], "domain": domain.name, "verifier": domain.verifier,
                 "answer_format": domain.answer_format, "split": split, "index": index}
      tokens = encode_prompt(tokenizer, render_messages(domain, example))
      if len(tokens) <= max_prompt_tokens and content_key(example["prompt"]) not in seen:
        seen.add(content_key(example["prompt"]))
        rows.append(tokens)
        examples.append(example)
        taken += 1
    if taken < prompts_per_domain:
      raise DataError(f"domain {domain.name!r}: its {split} split has {taken} distinct problems of at most "
                      f"{max_prompt_tokens} prompt tokens, fewer than eval.prompts_per_domain={prompts_per_domain}; "
                      f"set --config.eval.prompts_per_domain={taken} or less, or give the domain more problems "
                      "(a wider generator config or a larger file).")
  ids, mask = left_pad(rows, tokenizer.pad_token_id)
  return EvalSet(ids, mask, examples)


def _decode(tokenizer, rollouts) -> list[str]:
  tokens, mask = to_host(rollouts.tokens), to_host(rollouts.response_mask).astype(bool)
  return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(tokens, mask)]


def prompt_hash(example: dict) -> str:
  """A short hash of the question's content key (the splits' notion of "the same problem"): pairs prompts."""
  return hashlib.sha1(content_key(str(example["prompt"])).encode()).hexdigest()[:16]


def extracted_answer(completion: str, example: dict) -> str | None:
  """The answer a completion gives, normalised as the verifiers compare it (a letter for `choice`); None for
  `code` (a program has no single answer)."""
  if example["verifier"] == "code":
    return None
  answer = final_answer(completion)
  if answer is None:
    return None
  if example["verifier"] == "choice":
    return chosen_letter(answer, example.get("choices") or []) or normalize(answer)
  return normalize(answer)


def _references(example: dict) -> list[str]:
  answer = example.get("answer")
  if answer is None or example["verifier"] == "code":
    return []
  return [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]


def constant_baselines(examples: Sequence[dict], pool: RewardPool, candidates: int = 8) -> dict[str, float]:
  """{domain: the best accuracy on its `examples` of one answer given to every question}.

  The candidates are the `candidates` most frequent reference answers of the domain; each is scored as
  the completion "<answer>c</answer>" on every example by the domain's own verifier, so answers the
  verifier treats as equal (0.5 and 1/2) count together. Domains without reference answers (code) are
  left out.
  """
  baselines = {}
  for domain in dict.fromkeys(example["domain"] for example in examples):
    rows = [example for example in examples if example["domain"] == domain]
    counts = collections.Counter(normalize(ref) for example in rows for ref in _references(example))
    if not counts:
      continue
    best = [answer for answer, _ in counts.most_common(candidates)]
    tasks = [(f"<answer>{answer}</answer>", example) for answer in best for example in rows]
    scored = pool.score([text for text, _ in tasks], [e for _, e in tasks], [e["verifier"] for _, e in tasks])
    baselines[domain] = float(scored.correct.reshape(len(best), len(rows)).mean(axis=1).max())
  return baselines


def top_answer_share(answers: Sequence[str | None]) -> float:
  """The share of the most common answer (no answer counts as one answer, "")."""
  if not answers:
    return float("nan")
  return collections.Counter("" if a is None else a for a in answers).most_common(1)[0][1] / len(answers)


def evaluate(model: Transformer, tokenizer, eval_set: EvalSet, pool: RewardPool, *, max_new_tokens: int,
             k: int, temperature: float, stop_token_ids: Sequence[int], key: jax.Array, batch_size: int = 64,
             label: str = "eval", plan: DecodePlan = DecodePlan()) -> tuple[dict[str, float], list[dict]]:
  """(summary, per-prompt records) of greedy pass@1 and, for k > 0, mean@k (k samples at `temperature`).

  summary: "eval/<domain>/<metric>" and "eval/mean/<metric>" (each domain weighs the same) for pass@1,
  mean@k, constant_baseline (see `constant_baselines`), top_answer_share (of the greedy answers) and
  collapsed (1.0 when pass@1 is at or below the constant-answer baseline). Records: one per prompt, in
  eval-set order, with the greedy and the k sampled corrects and answers, so that statistics can be
  paired by prompt across runs. A progress line per batch goes to the console.
  """
  total, started, records = len(eval_set.examples), time.perf_counter(), []
  for start in range(0, total, batch_size):
    ids = eval_set.prompt_tokens[start:start + batch_size]
    mask = eval_set.prompt_mask[start:start + batch_size]
    examples = eval_set.examples[start:start + batch_size]
    results = {}
    for name, group, temp in (("greedy", 1, 0.0), ("sampled", k, temperature)):
      if group <= 0:
        continue
      rollouts = generate(model, ids, mask, group_size=group, max_new_tokens=max_new_tokens, temperature=temp,
                          stop_token_ids=stop_token_ids, key=key, step=start, pad_id=tokenizer.pad_token_id,
                          plan=plan)
      repeated = [example for example in examples for _ in range(group)]
      texts = _decode(tokenizer, rollouts)
      scored = score_held_rows(pool, texts, repeated, [e["verifier"] for e in repeated], rollouts.tokens)
      answers = [extracted_answer(text, example) for text, example in zip(texts, repeated)]
      results[name] = (scored.correct.reshape(-1, group), [answers[i:i + group] for i in range(0, len(texts), group)])
    for row, example in enumerate(examples):
      records.append({
          "domain": example["domain"], "index": example["index"], "prompt_hash": prompt_hash(example),
          "question": example["prompt"], "reference": _references(example)[0] if _references(example) else None,
          "greedy_correct": bool(results["greedy"][0][row, 0]), "greedy_answer": results["greedy"][1][row][0],
          "sampled_correct": [bool(c) for c in results["sampled"][0][row]] if "sampled" in results else [],
          "sampled_answers": results["sampled"][1][row] if "sampled" in results else []})
    if jax.process_index() == 0:
      done, elapsed = len(records), time.perf_counter() - started
      rate = done / elapsed
      print(f"{label}: {done}/{total} prompts | {rate:.2f} prompts/s | ETA {(total - done) / rate:.0f}s", flush=True)
  return summarize(records, constant_baselines(eval_set.examples, pool), k), records


def summarize(records: Sequence[dict], baselines: dict[str, float], k: int) -> dict[str, float]:
  """The eval summary (see `evaluate`) from per-prompt records and the constant-answer baselines."""
  summary: dict[str, float] = {}
  domains = list(dict.fromkeys(record["domain"] for record in records))
  for domain in domains:
    rows = [record for record in records if record["domain"] == domain]
    values = {"pass@1": np.mean([r["greedy_correct"] for r in rows])}
    if k > 0:
      values[f"mean@{k}"] = np.mean([np.mean(r["sampled_correct"]) for r in rows])
    if domain in baselines:  # domains with single answers (not code)
      values["top_answer_share"] = top_answer_share([r["greedy_answer"] for r in rows])
      values["constant_baseline"] = baselines[domain]
      values["collapsed"] = float(values["pass@1"] <= baselines[domain])
    summary.update({f"eval/{domain}/{metric}": float(value) for metric, value in values.items()})
  for metric in ("pass@1", f"mean@{k}", "top_answer_share", "constant_baseline"):
    per_domain = [summary[f"eval/{d}/{metric}"] for d in domains if f"eval/{d}/{metric}" in summary]
    if len(per_domain) == len(domains):
      summary[f"eval/mean/{metric}"] = float(np.mean(per_domain))
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


def write_eval(workdir: str, step: int, summary: dict[str, float], records: Sequence[dict] = ()) -> None:
  """eval/step_XXXXXX.json (the summary) and, given records, eval/step_XXXXXX.per_prompt.jsonl."""
  if jax.process_index() != 0:
    return
  directory = epath.Path(workdir) / "eval"
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"step_{step:06d}.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
  if records:
    per_prompt_path(workdir, step).write_text("".join(json.dumps(r) + "\n" for r in records))


def per_prompt_path(workdir, step: int) -> epath.Path:
  """Where `write_eval` saves the per-prompt records of `step`."""
  return epath.Path(workdir) / "eval" / f"step_{step:06d}.per_prompt.jsonl"


def read_per_prompt(workdir: str, step: int) -> list[dict]:
  """The per-prompt records `write_eval` saved for `step`."""
  return [json.loads(line) for line in per_prompt_path(workdir, step).read_text().splitlines()]
