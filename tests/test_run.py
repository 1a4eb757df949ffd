"""run.py end to end: the README's main command on the embedded default, and one-line config errors."""

import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def run_py(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "run.py", "--config=configs/multi_domain.py", *overrides],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_default_run_answers_the_chat_prompt_on_an_8_device_mesh():
  result = run_py("--config.mode=chat", "--config.chat.max_new_tokens=24")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in result.stdout
  assert "134.5M params" in result.stdout
  assert "Paris" in result.stdout.split("assistant:")[1]


BAD_CONFIGS = [  # (override, what the one line must say): each a mistake a user makes
    ("--config.model.dtyp=float32", r"config error: --config.model.dtyp: 'dtyp' Did you mean \"dtype\""),
    ("--config.objective.clip_eps=0.2", r"--config.objective.clip_eps: config.objective has no field 'clip_eps'; its "
     r"fields are agg, .*eps_high, eps_low"),
    ("--config.train.steps.x=1", r"--config.train.steps.x: config.train.steps is one value, not a group of fields"),
    ("--config=configs/nosuch.py", r"--config=configs/nosuch.py: \[Errno 2\] No such file or directory: "
     r"'configs/nosuch.py'; pass a config file and preset"),
    ("--config=configs/multi_domain.py:nosuch", r"--config=configs/multi_domain.py:nosuch: unknown preset 'nosuch'; "
     r"presets: default, tiny"),
    ("--config.model.remat=ful", r"--config.model.remat='ful' is not allowed \(did you mean 'full'\?\)"),
    ("--config.chat.max_new_tokens=abc", r"config error: .*max_new_tokens=abc"),
    ("--config.algorithm=ppo", r"--config.algorithm='ppo' is not allowed"),
    ("--config.resume=maybe", r"--config.resume='maybe' is not allowed"),
    ("--config.model.name=/no/such/checkpoint", r"--config.model.name: checkpoint directory /no/such/checkpoint does not exist"),
    ("--config.mesh.tensor=3", r"mesh: .*'tensor': 3.* does not divide the 8 devices"),
    ("--config.mesh.fsdp=0", r"--config.mesh.fsdp=0; use a positive size or -1"),
    ("--config.data.prompts_per_step=0", r"--config.data.prompts_per_step=0; use at least 1"),
    ("--config.data.max_sampling_rounds=-1", r"--config.data.max_sampling_rounds=-1; use 0 \(no extra rounds\)"),
    ("--config.data.domains=arithmetic,gcd", r"--config.data.domains=arithmetic,gcd: this field is a group of fields, "
     r"not one value; set one of them with --config.data.domains.<name>=<value>"),
    ("--config.data.domains.gcd.weight=-1", r"config.data.domains.gcd.weight=-1.0; use a positive number"),
    ("--config.rollout.group_size=1", r"--config.rollout.group_size=1; use at least 2"),
    ("--config.rollout.temperature=0", r"--config.rollout.temperature=0.0; use a positive temperature"),
    ("--config.objective.agg=mean", r"--config.objective.agg='mean'; choose one of"),
    ("--config.objective.dual_clip=0.5", r"--config.objective.dual_clip=0.5; use a value above 1"),
    ("--config.objective.head_warmup_steps=10", r"head_warmup_steps=10 is not below --config.train.steps=10"),
    ("--config.optim.schedule=linear", r"--config.optim.schedule='linear' is not allowed"),
    ("--config.optim.learning_rate=-1", r"--config.optim.learning_rate=-1.0; use a positive learning rate"),
    ("--config.train.minibatches=2", r"--config.train.minibatches=2 does not divide --config.data.prompts_per_step=3"),
    ("--config.train.micro_batches=2", r"--config.train.micro_batches=2 does not divide the 3 prompts of a minibatch"),
    ("--config.eval.split=dev", r"--config.eval.split='dev' is not allowed"),
    ("--config.eval.prompts_per_domain=100000", r"fewer than eval.prompts_per_domain=100000; set --config.eval"),
    ("--config.checkpoint.best_metric=eval/mean/acc", r"--config.checkpoint.best_metric='eval/mean/acc' is not an eval"),
    ("--config.checkpoint.keep_last=0", r"--config.checkpoint.keep_last=0; keep at least 1"),
]


def test_bad_input_exits_2_with_one_line_naming_the_field_and_leaves_no_workdir(tmp_path):
  import re
  import time
  slow = []
  for index, (override, message) in enumerate(BAD_CONFIGS):
    workdir = tmp_path / f"run{index}"
    started = time.perf_counter()
    result = run_py(override, f"--config.workdir={workdir}", timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, (override, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, (override, result.stderr[-2000:])
    assert re.search(message, lines[0]), (override, lines[0])
    assert not workdir.exists(), override
    if elapsed > 20:
      slow.append(f"{override}: {elapsed:.1f}s")
  assert not slow, slow  # within 20 s each, the start-up a typo costs


BAD_COMMANDS = [  # (command, what the one line must say): other entry points, run.py with its default --config
    (["run.py", "--config.trian.steps=1"], r"--config.trian.steps: 'trian' Did you mean \"train\""),
    (["-m", "mcpo_jax.experiments.compare", "--config.objective.clip_eps=0.1"],
     r"--config.objective.clip_eps: config.objective has no field 'clip_eps'"),
    (["-m", "mcpo_jax.aot", "--config=configs/multi_domain.py:nosuch"],
     r"--config=configs/multi_domain.py:nosuch: unknown preset 'nosuch'"),
    (["-m", "mcpo_jax.data.inspect"], r"--config is required"),
    (["run.py", "--config.workdir=/proc/mcpo-run"], r"--config.workdir=/proc/mcpo-run: cannot be written \(/proc: "),
]


def test_every_entry_point_reports_a_bad_flag_or_workdir_in_one_line():
  """ml_collections applies a default config file's overrides as the flag is defined: with no --config given, a
  typo raised a traceback at import; flag_errors catches it there too."""
  import re
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  for command, message in BAD_COMMANDS:
    result = subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (command, result.stderr[-2000:])
    assert re.search(r"^(config )?error: " + message, lines[0]), (command, lines[0])
