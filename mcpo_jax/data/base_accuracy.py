"""How often the untrained model is right on each domain: greedy, and sampled at the rollout temperature.

    python -m mcpo_jax.data.base_accuracy --config=configs/multi_domain.py:transfer [--split=validation]
        [--prompts=64] [--samples=4]

RL needs groups with reward variance: a domain where the base model is never or always right gives
GRPO nothing to learn from. The table also gives the share of sampled groups with variance and the
constant-answer baseline (the most common reference answer's share of the set). Uses the preset's
model, prompts, rollout.max_new_tokens, rollout.temperature and verifiers, as training does.
"""

from __future__ import annotations

import collections
from typing import Sequence

import jax
import numpy as np
from absl import app, flags

from mcpo_jax.flag_errors import define_config, parse_flags


def constant_baseline(answers: Sequence) -> float:
  """The accuracy of always giving the most common reference answer."""
  keys = [str(answer) for answer in answers]
  return collections.Counter(keys).most_common(1)[0][1] / len(keys)


def measure(config, split: str, prompts: int, samples: int, batch_size: int = 32) -> str:
  """A Markdown table, one row per domain; config: a RunConfig (mcpo_jax.config.build)."""
  from mcpo_jax.evaluation import build_eval_set
  from mcpo_jax.model import from_pretrained, load_tokenizer
  from mcpo_jax.rewards import RewardPool
  from mcpo_jax.rl_loop import stop_token_ids
  from mcpo_jax.sampling import generate

  model = from_pretrained(config.model.name, dtype=config.model.dtype)
  tokenizer = load_tokenizer(config.model.tokenizer or config.model.name)
  eval_set = build_eval_set(config.data.domains, tokenizer, prompts_per_domain=prompts, split=split,
                            max_prompt_tokens=config.data.max_prompt_tokens)
  examples = eval_set.examples
  names = np.array([example["domain"] for example in examples])  # [M]
  results = {}
  with RewardPool(0) as pool:
    for label, group, temperature in (("greedy", 1, 0.0), ("sampled", samples, config.rollout.temperature)):
      correct, truncated = [], []
      for start in range(0, len(examples), batch_size):  # bounded KV cache
        rollouts = generate(model, eval_set.prompt_tokens[start:start + batch_size],
                            eval_set.prompt_mask[start:start + batch_size], group_size=group,
                            max_new_tokens=config.rollout.max_new_tokens, temperature=temperature,
                            stop_token_ids=stop_token_ids(tokenizer), key=jax.random.key(0), step=start,
                            pad_id=tokenizer.pad_token_id)
        tokens, mask = np.asarray(rollouts.tokens), np.asarray(rollouts.response_mask).astype(bool)
        texts = [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(tokens, mask)]
        repeated = [example for example in examples[start:start + batch_size] for _ in range(group)]
        correct.append(pool.score(texts, repeated, [e["verifier"] for e in repeated]).correct.reshape(-1, group))
        truncated.append(np.asarray(rollouts.truncated).reshape(-1, group))
      results[label] = np.concatenate(correct), np.concatenate(truncated)  # [M, group] each
  lines = [f"{split}: {prompts} prompts per domain, greedy and {samples} samples at temperature "
           f"{config.rollout.temperature}, max_new_tokens={config.rollout.max_new_tokens}",
           "| domain | greedy | sampled | groups with variance | truncated (sampled) | constant answer |",
           "|---|---|---|---|---|---|"]
  for name in dict.fromkeys(names):
    rows = names == name
    greedy, sampled = results["greedy"][0][rows], results["sampled"][0][rows]
    varied = (sampled.min(axis=1) != sampled.max(axis=1)).mean()
    baseline = constant_baseline([example["answer"] for example, keep in zip(examples, rows) if keep])
    lines.append(f"| {name} | {greedy.mean():.3f} | {sampled.mean():.3f} | {varied:.2f} | "
                 f"{results['sampled'][1][rows].mean():.2f} | {baseline:.3f} |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  from mcpo_jax.console import quiet_libraries
  quiet_libraries()
  from mcpo_jax.config import build
  print(measure(build(_CONFIG.value), _SPLIT.value, _PROMPTS.value, _SAMPLES.value))


if __name__ == "__main__":  # flags only when run as a program, so that importing defines none
  _CONFIG = define_config(None, "Run config, e.g. configs/multi_domain.py:transfer.")
  _SPLIT = flags.DEFINE_string("split", "validation", "Split to measure on.")
  _PROMPTS = flags.DEFINE_integer("prompts", 64, "Prompts per domain.")
  _SAMPLES = flags.DEFINE_integer("samples", 4, "Samples per prompt at the rollout temperature.")
  app.run(main, flags_parser=parse_flags)
