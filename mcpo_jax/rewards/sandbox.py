"""Running untrusted Python (model-written code) contained, in a subprocess (Linux ≥ 5.3).

Layers, outermost first:
- kernel: a new session, so the whole process group is killed on the wall-clock timeout; death with
  the parent (PR_SET_PDEATHSIG), so a reward worker replaced at its deadline leaves nothing running;
  rlimits set in preexec (CPU seconds, address space, file size, processes, open files, no core dumps);
  and, where the kernel allows unprivileged user namespaces (probed once per process),
  `unshare --user --map-root-user --net`: a network namespace without interfaces, so no network at all.
- process: `python -I -S` (no PYTHON* variables, no site-packages), a scrubbed environment, a fresh
  temporary directory as cwd and HOME; stdout/stderr go to files that RLIMIT_FSIZE caps.
- interpreter: `sandbox_boot.py` installs an audit hook before the program runs that refuses
  sockets, new processes, signals, ctypes, writes and deletions outside the work directory, reading
  /proc and /sys (where the parent's environment is).

Where `unshare` is unavailable, the audit hook alone blocks the network. The audit hook guards against
accidents and reward hacks, not a determined attacker (interpreter bugs can bypass it). The kernel does
not apply RLIMIT_NPROC to root outside a user namespace; there the hook is what stops a fork bomb.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BOOT = str(Path(__file__).with_name("sandbox_boot.py"))
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
UNSHARE = ("unshare", "--user", "--map-root-user", "--net")


@dataclass(frozen=True)
class Limits:
  wall_s: float = 5.0      # wall-clock seconds before the process group is killed
  cpu_s: int = 5           # RLIMIT_CPU
  memory_mb: int = 1024    # RLIMIT_AS
  file_mb: int = 16        # RLIMIT_FSIZE: any file written, stdout and stderr included
  processes: int = 8       # RLIMIT_NPROC (threads count too)
  open_files: int = 64     # RLIMIT_NOFILE


@dataclass(frozen=True)
class RunResult:
  returncode: int    # negative: killed by that signal
  stdout: str
  stderr: str
  timed_out: bool
  finished: bool     # every source ran to its end (the secret end marker was printed)


@functools.cache
def network_isolation() -> tuple[str, ...]:
  """The `unshare` prefix if this kernel lets us create a user + network namespace, else ()."""
  if shutil.which("unshare") is None:
    return ()
  try:
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10, env={"PATH": "/usr/bin:/bin"})
  except (OSError, subprocess.TimeoutExpired):
    return ()
  return UNSHARE if probe.returncode == 0 else ()


def _set_limits(limits: Limits) -> None:
  """preexec_fn: runs in the child between fork and exec (safe: reward workers are single-threaded)."""
  LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  megabyte = 1024 * 1024
  for kind, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb * megabyte),
                      (resource.RLIMIT_FSIZE, limits.file_mb * megabyte), (resource.RLIMIT_NPROC, limits.processes),
                      (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(kind, (value, value))


def run_python(sources: list[tuple[str, str]], *, stdin: str = "", limits: Limits = Limits()) -> RunResult:
  """Runs `sources` ([(file name, code)], executed in order in one namespace) with `stdin`."""
  with tempfile.TemporaryDirectory(prefix="mcpo_sandbox_", ignore_cleanup_errors=True) as root:
    work = Path(root) / "work"
    work.mkdir()
    marker = secrets.token_hex(16)
    (work / "job.json").write_text(json.dumps({"sources": sources, "marker": marker}), encoding="utf-8")
    (Path(root) / "stdin").write_text(stdin, encoding="utf-8")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
    command = [*network_isolation(), sys.executable, "-I", "-S", "-B", BOOT, "job.json"]
    with open(Path(root) / "stdin", "rb") as stdin_file, open(Path(root) / "stdout", "wb") as stdout_file, \
         open(Path(root) / "stderr", "wb") as stderr_file:
      process = subprocess.Popen(command, cwd=work, env=env, stdin=stdin_file, stdout=stdout_file,
                                 stderr=stderr_file, start_new_session=True,
                                 preexec_fn=functools.partial(_set_limits, limits))
      exited = os.pidfd_open(process.pid)  # readable once the process exits; it is not reaped yet
      try:
        timed_out = not select.select([exited], [], [], limits.wall_s)[0]
        # Unreaped, the leader keeps the group id ours: kill any stray member, then reap.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
      finally:
        os.close(exited)
    stdout = (Path(root) / "stdout").read_bytes().decode("utf-8", "replace")  # RLIMIT_FSIZE caps the size
    stderr = (Path(root) / "stderr").read_bytes().decode("utf-8", "replace")
  finished = not timed_out and process.returncode == 0 and f"\n{marker}\n" in stdout
  return RunResult(process.returncode, stdout.replace(f"\n{marker}\n", ""), stderr[-4000:], timed_out, finished)
