"""The entry points' XLA flags: added once, on CPU-only installs, never overriding what the user set."""

import os

import pytest

from mcpo_jax import xla_flags
from mcpo_jax.xla_flags import CPU_FLAGS, set_default_xla_flags

NAME = next(iter(CPU_FLAGS))
OURS = f"--{NAME}={CPU_FLAGS[NAME]}"


@pytest.fixture
def cpu_install(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(xla_flags.importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda name: None)


def test_flags_are_appended_to_the_users_other_flags(cpu_install, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  set_default_xla_flags()
  set_default_xla_flags()  # idempotent
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {OURS}"


def test_a_flag_the_user_set_is_kept(cpu_install, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--{NAME}=LIBRARY_FUSION_TYPE_DOT")
  set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == f"--{NAME}=LIBRARY_FUSION_TYPE_DOT"


def test_no_xla_flags_at_all(cpu_install, monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == OURS


@pytest.mark.parametrize("how", ["tpu", "cuda plugin", "JAX_PLATFORMS=tpu"])
def test_nothing_is_added_where_an_accelerator_backend_may_run(cpu_install, monkeypatch, how):
  """An XLA of another version may not know the flag (it aborts on unknown flags): leave it alone."""
  if how == "tpu":
    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
  elif how == "cuda plugin":
    monkeypatch.setattr(xla_flags.importlib.metadata, "entry_points", lambda group: ["jax_cuda13_plugin"])
  else:
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
