"""The evaluation's own noise floor: how small a mean@k difference it could resolve if training added no noise.

  python -m mcpo_jax.experiments.noise_floor --config=configs/multi_domain.py:compare [--seeds=2]

Evaluates the initial policy once with 2k samples per held-out prompt and splits them into two
independent mean@k evaluations of the same policy: their paired difference is pure sampling noise,
the least noise any comparison of two arms with this eval set and k carries. The bootstrap standard
error of that difference (per domain and on average), scaled to --seeds seeds, gives the smallest
detectable mean@k difference (2.8 SE) when trained arms differ by nothing else; seed-to-seed training
variation only adds to it. Greedy pass@1 has no such floor: one policy's greedy answers do not vary.
Also printed: the initial policy's pass@1, mean@k, the constant-answer baselines and answer shares.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags

from mcpo_jax.experiments.stats import noise_floor
from mcpo_jax.flag_errors import define_config, parse_flags

_CONFIG = define_config("configs/multi_domain.py:compare", "Run config file[:preset].")
_SEEDS = flags.DEFINE_integer("seeds", 2, "Seeds per arm of the comparison the floor is scaled to.")
_OUT = flags.DEFINE_string("out", "", "Also write the numbers to this JSON file.")


def main(argv) -> None:
  del argv
  from mcpo_jax.console import quiet_libraries
  quiet_libraries()
  from mcpo_jax import config as config_lib
  from mcpo_jax.evaluation import build_eval_set, evaluate
  from mcpo_jax.mesh import make_mesh
  from mcpo_jax.model import from_pretrained, load_tokenizer
  from mcpo_jax.rewards import RewardPool
  from mcpo_jax.rl_loop import stop_token_ids

  config = config_lib.build(_CONFIG.value)
  k = config.eval.k
  if k <= 0:
    sys.exit("error: --config.eval.k must be > 0: the floor is that of mean@k.")
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  model = from_pretrained(config.model.name, mesh=mesh, dtype=config.model.dtype,
                          param_dtype=config.model.param_dtype)
  tokenizer = load_tokenizer(config.model.tokenizer or config.model.name)
  eval_set = build_eval_set(config.data.domains, tokenizer,
                            prompts_per_domain=config.eval.prompts_per_domain, split=config.eval.split,
                            max_prompt_tokens=config.data.max_prompt_tokens)
  with RewardPool(config.rewards.processes, timeout_s=config.rewards.timeout_s) as pool:
    summary, records = evaluate(model, tokenizer, eval_set, pool, max_new_tokens=config.eval.max_new_tokens,
                                k=2 * k, temperature=config.rollout.temperature,
                                stop_token_ids=stop_token_ids(tokenizer), key=jax.random.key(config.seed),
                                label="noise floor eval")
  floor = noise_floor(records, k, _SEEDS.value)
  columns = [*dict.fromkeys(r["domain"] for r in records), "average"]
  get = lambda d, metric: summary.get(f"eval/{'mean' if d == 'average' else d}/{metric}", float("nan"))
  lines = [f"| {config.eval.prompts_per_domain} prompts/domain, k = {k}, {_SEEDS.value} seeds | " +
           " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  rows = [("initial pass@1", lambda d: get(d, "pass@1")),
          (f"initial mean@{2 * k}", lambda d: get(d, f"mean@{2 * k}")),
          ("constant-answer baseline", lambda d: get(d, "constant_baseline")),
          ("most common greedy answer's share", lambda d: get(d, "top_answer_share")),
          (f"SE of a null mean@{k} difference", lambda d: floor[d]["se"]),
          (f"smallest detectable mean@{k} difference (2.8 SE)", lambda d: floor[d]["detectable"])]
  lines += [f"| {name} | " + " | ".join(f"{value(d):.3f}" for d in columns) + " |" for name, value in rows]
  print("\n".join(lines))
  if _OUT.value:
    with open(_OUT.value, "w") as file:
      json.dump({"summary": summary, "floor": floor, "k": k, "seeds": _SEEDS.value}, file, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
