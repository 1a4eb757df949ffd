"""run.py end to end: the README's main command on the embedded default, and one-line config errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("override, message", [
    ("--config.model.dtyp=float32", r"config error: 'dtyp' Did you mean \"dtype\""),
    ("--config.model.remat=ful", r"remat='ful' is not allowed \(did you mean 'full'\?\)"),
    ("--config.mesh.tensor=3", r"1×-1×3|multiply to 3, which does not divide the 8 devices"),
    ("--config.model.name=/no/such/checkpoint", r"/no/such/checkpoint does not exist"),
    ("--config.chat.max_new_tokens=abc", r"config error: .*max_new_tokens=abc"),
])
def test_bad_input_is_one_clear_line(override, message):
  import re
  result = run_py(override, timeout=120)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  last_line = result.stderr.strip().splitlines()[-1]
  assert re.search(message, last_line), last_line
