"""A reward worker process: reads (index, verifier, completion, example) from a pipe, answers
(index, (score, error or None)), until it reads None or the pipe closes.

Started by RewardPool as `python -c BOOTSTRAP`, which ignores SIGINT and SIGTERM before anything is
imported: a signal to the trainer's process group is the trainer's to handle, and the pool ends its
workers itself. It dies with the trainer (PR_SET_PDEATHSIG), and so do its sandboxes (--die-with-parent).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from multiprocessing.connection import Connection

BOOTSTRAP = ("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "signal.signal(signal.SIGINT, signal.SIG_IGN)\nfrom mcpo_jax.rewards.worker import main\nmain()")
PR_SET_PDEATHSIG = 1


def main() -> None:
  """argv: READ_FD WRITE_FD SANDBOX_MODE PARENT_PID."""
  read_fd, write_fd, mode, parent = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
  ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  if os.getppid() != parent:  # the trainer died before the line above
    return
  from mcpo_jax.rewards import sandbox
  from mcpo_jax.rewards.registry import score_one
  sandbox.set_mode(mode)
  tasks, answers = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
  while True:
    try:
      task = tasks.recv()
    except (EOFError, OSError):
      return
    if task is None:
      return
    index, verifier, completion, example = task
    try:
      answers.send((index, score_one(verifier, completion, example)))
    except OSError:  # the pool is gone
      return
