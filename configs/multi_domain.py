"""Default run config. Presets: `--config=configs/multi_domain.py:<preset>`; any field can be overridden
with `--config.<field>=<value>` (e.g. `--config.model.name=/path/to/hf_checkpoint --config.mesh.tensor=4`).
"""

import ml_collections

PRESETS = ("default", "tiny")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.preset = preset or "default"
  config.seed = 0
  config.workdir = "runs/default"

  config.model = ml_collections.ConfigDict()
  # An HF checkpoint directory (local or gs://), a .gguf file, or a zoo name.
  config.model.name = "smollm2-135m-instruct"
  config.model.tokenizer = ""  # empty: the tokenizer stored with the model
  config.model.dtype = "float32"  # compute dtype ("bfloat16" on TPU)
  config.model.param_dtype = ""  # empty: same as dtype
  config.model.remat = "none"  # none | full | save_dots

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.fsdp = -1  # -1: the rest of the devices
  config.mesh.tensor = 1

  config.chat = ml_collections.ConfigDict()
  config.chat.prompt = "What is the capital of France? Answer in one sentence."
  config.chat.max_new_tokens = 64
  config.chat.temperature = 0.0  # 0 = greedy
  config.chat.top_p = 1.0
  config.chat.top_k = 0

  if config.preset == "tiny":
    config.chat.max_new_tokens = 8
  elif config.preset != "default":
    raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}.")
  return config
