"""mcpo_jax entry point: `python run.py --config=configs/multi_domain.py [--config.<field>=<value> ...]`.

`--config.mode=train` (default) runs the RL loop (mcpo_jax/rl_loop.py); `--config.mode=chat`
loads the checkpoint onto the mesh and answers `--config.chat.prompt`.
"""

from __future__ import annotations

import sys
import time

from mcpo_jax.console import quiet_libraries
from mcpo_jax.tpu_flags import set_tpu_flags

quiet_libraries()  # before transformers is imported
set_tpu_flags()  # before libtpu loads

import jax
import numpy as np
from absl import app

from mcpo_jax import config as config_lib
from mcpo_jax.checkpointing import PREEMPTED_EXIT_CODE, Preempted, ResumeError
from mcpo_jax.mesh import MeshError, make_mesh, maybe_initialize_distributed
from mcpo_jax.model import CheckpointError, ModelConfigError, from_pretrained, load_tokenizer
from mcpo_jax.rewards import SandboxUnavailable
from mcpo_jax.data.errors import DataError
from mcpo_jax.flag_errors import BAD_INPUT_EXIT_CODE, define_config, parse_flags
from mcpo_jax.rl_loop import TrainingDiverged, stop_token_ids, train
from mcpo_jax.sampling import generate

_CONFIG = define_config("configs/multi_domain.py", "Run config file[:preset].")


def chat(model, tokenizer, config) -> str:
  """Answers config.chat.prompt with the model's chat template."""
  messages = [{"role": "user", "content": config.chat.prompt}]
  encoded = tokenizer.apply_chat_template([messages], add_generation_prompt=True, padding=True, return_dict=True)
  rollouts = generate(
      model, encoded["input_ids"], encoded["attention_mask"], group_size=1,
      max_new_tokens=config.chat.max_new_tokens, temperature=config.chat.temperature, top_p=config.chat.top_p,
      top_k=config.chat.top_k, stop_token_ids=stop_token_ids(tokenizer), key=jax.random.key(config.seed),
      pad_id=tokenizer.pad_token_id)
  tokens = np.asarray(rollouts.tokens[0])[np.asarray(rollouts.response_mask[0]).astype(bool)]
  return tokenizer.decode(tokens, skip_special_tokens=True)


# Found before or at start-up, each one line naming the field, file or path and the fix.
USER_ERRORS = (config_lib.ConfigError, MeshError, CheckpointError, ModelConfigError, DataError, FileNotFoundError,
               ResumeError, SandboxUnavailable)


def main(argv) -> None:
  del argv
  quiet_libraries()  # again: absl set its verbosity from its flags
  try:
    run(config_lib.build(_CONFIG.value))
  except TrainingDiverged as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  except USER_ERRORS as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE)
  except Preempted as preempted:  # a documented exit status, so a scheduler can tell it from a failure
    print(preempted, file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)


def run(config) -> None:
  maybe_initialize_distributed()
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s)")
  if config.mode == "train":
    train(config)
    return
  start = time.perf_counter()
  model = from_pretrained(config.model.name, mesh=mesh, dtype=config.model.dtype,
                          param_dtype=config.model.param_dtype or None, remat=config.model.remat,
                          attention=config.model.attention)
  tokenizer = load_tokenizer(config.model.tokenizer or config.model.name)
  print(f"loaded {config.model.name}: {model.config.num_params / 1e6:.1f}M params, "
        f"{model.config.num_layers} layers, in {time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  reply = chat(model, tokenizer, config)
  print(f"user: {config.chat.prompt}\nassistant: {reply}\n({time.perf_counter() - start:.1f}s incl. compile)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
