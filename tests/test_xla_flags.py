"""The entry points' XLA flags: added once, never overriding what the user set."""

import os

from mcpo_jax.xla_flags import CPU_FLAGS, set_default_xla_flags

NAME = next(iter(CPU_FLAGS))


def test_flags_are_appended_to_the_users_other_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  set_default_xla_flags()
  set_default_xla_flags()  # idempotent
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 --{NAME}={CPU_FLAGS[NAME]}"


def test_a_flag_the_user_set_is_kept(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--{NAME}=LIBRARY_FUSION_TYPE_DOT")
  set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == f"--{NAME}=LIBRARY_FUSION_TYPE_DOT"


def test_no_xla_flags_at_all(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  set_default_xla_flags()
  assert os.environ["XLA_FLAGS"] == f"--{NAME}={CPU_FLAGS[NAME]}"
