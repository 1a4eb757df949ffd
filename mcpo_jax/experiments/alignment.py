"""Does a trained policy represent the same problem alike across formats? The mechanism MCPO claims.

  python -m mcpo_jax.experiments.alignment --config=configs/multi_domain.py:compare --runs_dir=runs/transfer \
      --arms=grpo-mixed,mcpo --seeds=0,1,2,3 [--prompts=150] [--out=docs/results]

For the initial policy and each run's exported final policy (`<runs_dir>/<arm>/seed<s>/hf_export`), the
greedy response to each of the first `--prompts` held-out problems of every domain is pooled as MCPO's
contrastive term pools rollouts (the mean over response tokens of the final hidden state, before the
head). The representations are centred (the mean over every problem and format is subtracted; raw
pooled states share one dominant direction) and, per pair of formats, the alignment of problem p is
cos(same problem in the two formats) − mean cos(p in one format, every other problem in the other).
0 = the formats' representations carry no problem identity; higher = the same problem looks alike
across formats. Domains must be formats of one problem set, matched by position (the transfer task:
held-out operand pairs are in the same hash order in every format).

Each policy's per-problem values are kept beside its run (`alignment_<split>_<prompts>.npy`), so a rerun
measures only the runs added since. Writes <out>/alignment.json and alignment.png: per policy, the mean
alignment over problems and format pairs with a 95% CI (a cluster bootstrap over seeds and problems), and each arm − mixed GRPO.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import app, flags

from mcpo_jax.flag_errors import define_config, parse_flags


def _define_flags():
  """The command's flags, defined only when it runs as a program (compare defines --config too)."""
  return (define_config("configs/multi_domain.py:compare", "The comparison's config."),
          flags.DEFINE_string("runs_dir", "runs/compare", "The comparison's run directories."),
          flags.DEFINE_list("arms", ["grpo-mixed", "mcpo"], "Arms to measure; the first is the reference."),
          flags.DEFINE_list("seeds", ["0", "1"], "Seeds of every arm."),
          flags.DEFINE_integer("prompts", 150, "Held-out problems per format."),
          flags.DEFINE_string("out", "docs/results", "Where alignment.json and alignment.png go."))


def pooled_responses(model, tokenizer, eval_set, *, max_new_tokens: int, stop_token_ids: Sequence[int],
                     batch_size: int = 64) -> np.ndarray:
  """[M, E] float32: each eval prompt's greedy response, pooled over its tokens (objectives.pool_response)."""
  import jax
  from flax import nnx

  from mcpo_jax.objectives import pool_response
  from mcpo_jax.sampling import generate
  from mcpo_jax.train import response_states

  @jax.jit
  def pool(model_state, prompt_tokens, prompt_mask, tokens, mask):  # [B, P], [B, P], [B, T], [B, T] -> [B, E]
    states = response_states(nnx.merge(graphdef, model_state), prompt_tokens, prompt_mask, tokens, mask)[1]
    return pool_response(states, mask)

  graphdef, model_state = nnx.split(model)
  out = []
  for start in range(0, len(eval_set.examples), batch_size):
    ids = eval_set.prompt_tokens[start:start + batch_size]
    mask = eval_set.prompt_mask[start:start + batch_size]
    rollouts = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=0.0,
                        stop_token_ids=stop_token_ids, key=jax.random.key(0), pad_id=tokenizer.pad_token_id)
    out.append(np.asarray(pool(model_state, rollouts.prompt_tokens, rollouts.prompt_mask, rollouts.tokens,
                               rollouts.response_mask)))
  return np.concatenate(out)


def alignment(pooled: np.ndarray, formats: int) -> np.ndarray:
  """[P] per-problem alignment (see the module docstring) from pooled [F·P, E], format-major, averaged over
  the F(F−1)/2 format pairs."""
  x = pooled.reshape(formats, -1, pooled.shape[-1]).astype(np.float64)  # [F, P, E]
  x = x - x.mean(axis=(0, 1))
  x /= np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  problems = x.shape[1]
  per_pair = []
  for f, g in itertools.combinations(range(formats), 2):
    cos = x[f] @ x[g].T  # [P, P]
    same = np.diag(cos)
    other = (cos.sum(1) + cos.sum(0) - 2 * same) / (2 * (problems - 1))  # mean over both directions
    per_pair.append(same - other)
  return np.mean(per_pair, axis=0)


def measure(base, runs_dir: str, arms: Sequence[str], seeds: Sequence[int], prompts: int) -> dict:
  """{"start": [P], arm: [S, P]} per-problem alignments."""
  from mcpo_jax.config import build
  from mcpo_jax.evaluation import build_eval_set
  from mcpo_jax.model import from_pretrained, load_tokenizer
  from mcpo_jax.rl_loop import stop_token_ids

  run = build(base)
  tokenizer = load_tokenizer(run.model.tokenizer or run.model.name)
  eval_set = build_eval_set(run.data.domains, tokenizer, prompts_per_domain=prompts, split=run.eval.split,
                            max_prompt_tokens=run.data.max_prompt_tokens)
  formats = len(run.data.domains)
  pairs = [tuple(sorted(e.get("metadata", {}).items())) or e["index"] for e in eval_set.examples]
  if pairs[:prompts] * formats != pairs:
    raise ValueError("the domains' held-out problems do not line up by position; alignment needs one problem set "
                     "asked in several formats (the transfer task).")
  stops = stop_token_ids(tokenizer)

  def of(path: str, cache: Path) -> np.ndarray:
    """The policy at `path`'s per-problem alignment [P], kept in `cache` so that a rerun adds only new runs."""
    if cache.exists():
      return np.load(cache)
    model = from_pretrained(path, dtype=run.model.dtype)
    print(f"alignment: {path}", flush=True)
    values = alignment(pooled_responses(model, tokenizer, eval_set, max_new_tokens=run.eval.max_new_tokens,
                                        stop_token_ids=stops), formats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, values)
    return values

  name = f"alignment_{run.eval.split}_{prompts}.npy"
  result = {"start": of(run.model.name, Path(runs_dir) / f"start_{name}")}
  for arm in arms:
    result[arm] = np.stack([of(f"{runs_dir}/{arm}/seed{seed}/hf_export", Path(runs_dir) / arm / f"seed{seed}" / name)
                            for seed in seeds])  # [S, P]
  return result


def report(values: dict, arms: Sequence[str], seeds: Sequence[int], out: Path) -> dict:
  from dataclasses import asdict

  from mcpo_jax.experiments.stats import cluster_bootstrap

  reference = arms[0] if arms else None
  summary = {"start": asdict(cluster_bootstrap({"alignment": values["start"][None]})["alignment"])}
  for arm in arms:
    summary[arm] = asdict(cluster_bootstrap({"alignment": values[arm]})["alignment"])
    if arm != reference:
      summary[f"{arm} − {reference}"] = asdict(cluster_bootstrap(
          {"alignment": values[arm] - values[reference]})["alignment"])
  out.mkdir(parents=True, exist_ok=True)
  (out / "alignment.json").write_text(json.dumps({"seeds": list(seeds), "summary": summary}, indent=2))

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  figure, ax = plt.subplots(figsize=(5, 3.6))
  labels = ["start", *arms]
  for i, label in enumerate(labels):
    entry = summary[label]
    ax.errorbar([i], [entry["estimate"]], yerr=[[entry["estimate"] - entry["low"]], [entry["high"] - entry["estimate"]]],
                fmt="o", capsize=4)
    if label != "start":
      ax.scatter(np.full(len(seeds), i + 0.12), values[label].mean(axis=1), s=10, color="gray")
  ax.axhline(0, color="black", lw=0.5)
  ax.set_xticks(range(len(labels)), labels)
  ax.set_ylabel("same-problem − different-problem cosine")
  ax.set_title("cross-format alignment of pooled responses\n(95% CI; grey: one seed's mean)", fontsize=9)
  figure.tight_layout()
  figure.savefig(out / "alignment.png", dpi=120)
  plt.close(figure)
  return summary


def main(argv, flag_values) -> None:
  del argv
  from mcpo_jax.console import quiet_libraries
  quiet_libraries()
  config, runs_dir, arms, seeds, prompts, out = (flag.value for flag in flag_values)
  seeds = [int(s) for s in seeds]
  values = measure(config, runs_dir, arms, seeds, prompts)
  summary = report(values, arms, seeds, Path(out))
  for label, entry in summary.items():
    print(f"{label}: {entry['estimate']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}]")


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags), flags_parser=parse_flags)
