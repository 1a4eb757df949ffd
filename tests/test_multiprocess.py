"""The multi-host code path on one machine: run.py as 2 jax.distributed processes × 4 CPU devices.

On a TPU pod every worker runs the same command and sees only its own devices; here two local
processes play the two hosts. Any host-side iteration of an array that is not fully addressable
(np.asarray of a global array, device_put of a local array onto the global mesh) fails in this
setting, so the run finishing is the check; its metrics must also equal a single process with all
8 devices on the same mesh shape.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import learnable_flags

from mcpo_jax.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(learnable_task, workdir):
  return [sys.executable, "run.py", "--config=configs/multi_domain.py:tiny", f"--config.workdir={workdir}",
          *learnable_flags(learnable_task, STEPS), "--config.mesh.data=2", "--config.mesh.fsdp=-1",
          "--config.checkpoint.every=1", "--config.export_hf=true", "--config.diag_every=1"]


def test_two_processes_run_the_rl_loop_like_one(learnable_task, tmp_path):
  base = dict(os.environ, HF_HUB_OFFLINE="1")
  single = subprocess.run(_command(learnable_task, tmp_path / "single"), cwd=REPO, capture_output=True, text=True,
                          env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=900)
  assert single.returncode == 0, single.stderr[-3000:]

  workdir, port = tmp_path / "multi", _free_port()
  env = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES="2")
  processes = [subprocess.Popen(_command(learnable_task, workdir), cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in processes]
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-4000:]
  assert "over 8 cpu device(s)" in outputs[0][0] and "'data': 2, 'fsdp': 4" in outputs[0][0]
  assert f"step {STEPS}/{STEPS}" in outputs[0][0] and "step" not in outputs[1][0]  # only process 0 reports

  want, got = read_metrics(tmp_path / "single"), read_metrics(workdir)
  assert sorted(got) == sorted(want)
  for step in range(1, STEPS + 1):
    # Step 1 sees the same weights: equal up to float32 summation order (gloo vs in-process all-reduce).
    # Later steps follow an AdamW update at lr 1e-2, whose m/sqrt(v) magnifies those last-bit differences.
    tolerance = 1e-5 if step == 1 else 1e-3
    for name in ("reward", "loss", "grad_norm", "entropy", "contrastive", "kl", "response_length"):
      if name in want[step]:
        assert abs(got[step][name] - want[step][name]) <= tolerance * max(1.0, abs(want[step][name])), (
            step, name, got[step][name], want[step][name])
  assert any(want[s]["reward"] > 0 and want[s]["grad_norm"] > 0 for s in range(1, STEPS + 1))  # not a trivial run
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [STEPS - 1, STEPS]
  assert (workdir / "hf_export" / "model.safetensors").exists()
  assert json.loads((workdir / "evaluations.json").read_text()).keys() == {"start", "end"}
