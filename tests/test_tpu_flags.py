"""mcpo_jax.tpu_flags: the XLA:TPU flags are added to LIBTPU_INIT_ARGS, and a user's own setting wins."""

from mcpo_jax.tpu_flags import TPU_FLAGS, set_tpu_flags


def test_flags_are_added_to_an_empty_environment():
  environ = {}
  set_tpu_flags(environ)
  assert environ["LIBTPU_INIT_ARGS"].split() == [f"--{name}={value}" for name, value in TPU_FLAGS.items()]


def test_the_users_flags_are_kept_and_their_setting_of_ours_wins():
  name = next(iter(TPU_FLAGS))
  environ = {"LIBTPU_INIT_ARGS": f"--xla_other=1 --{name}=true"}
  set_tpu_flags(environ)
  args = environ["LIBTPU_INIT_ARGS"].split()
  assert args[:2] == ["--xla_other=1", f"--{name}=true"] and len(args) == 2 + len(TPU_FLAGS) - 1
  assert set_tpu_flags(environ) == environ["LIBTPU_INIT_ARGS"]  # idempotent
