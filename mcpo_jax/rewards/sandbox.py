"""Running untrusted Python (model-written code) in a bubblewrap sandbox (Linux, user namespaces).

Each run is `bwrap --unshare-all --unshare-user`: fresh user, PID, mount, network, IPC, UTS and cgroup
namespaces. Inside it sees a read-only interpreter and standard library (site-packages hidden), the
shared libraries under /usr/lib, a private /proc of its own PID namespace, a minimal /dev, and a size-
capped tmpfs as work directory, and nothing else: not the trainer's files, the datasets, /etc, or the
host's environment. A seccomp filter (seccomp.py, x86-64) refuses new processes (threads are allowed),
ptrace, bpf, io_uring, keyrings, mounts and the other calls that reach kernel code a program has no use
for. It runs as uid/gid 65534 with no capabilities (outside, that uid maps to the trainer's, which it
cannot act as: it sees no file or process of the host), cannot create further user namespaces, has no
network interface but its own loopback, and dies with its parent. `sandbox_boot.py` applies the rlimits
inside the namespaces (RLIMIT_NPROC counts per user namespace there, but the kernel skips it for root's
processes: when the trainer is root, the seccomp filter is what stops a fork bomb) and keeps an audit
hook as a second layer. The wall-clock kill goes to the namespace's init, and the kernel kills every
process in a PID namespace whose init dies, so nothing is left running.

The program's job (its sources and the calls to evaluate) arrives on a file descriptor; stdout,
stderr and the structured results go to memory files that RLIMIT_FSIZE caps. Nothing secret enters the
sandbox: expected values stay in the parent (see code.py).

`set_mode("unsafe")` runs the same boot without namespaces (rlimits, a new session and the audit hook
only), for machines without bubblewrap or user namespaces; a caller opts in explicitly.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mcpo_jax.rewards import seccomp

BOOT_SOURCE = Path(__file__).with_name("sandbox_boot.py").read_text(encoding="utf-8")
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
MODES = ("bwrap", "unsafe")
WORK = "/work"
SANDBOX_UID = 65534  # nobody
TMPFS_BYTES = 64 * 2**20
SECCOMP = seccomp.program()
FIX = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) and allow user namespaces "
       "(sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 also "
       "kernel.apparmor_restrict_unprivileged_userns=0), "
       "or set --config.rewards.sandbox=unsafe to run model-written code without kernel isolation")
_mode = "bwrap"


class SandboxUnavailable(RuntimeError):
  pass


@dataclass(frozen=True)
class Limits:
  wall_s: float = 5.0      # wall-clock seconds before the namespace is killed
  cpu_s: int = 5           # RLIMIT_CPU
  memory_mb: int = 1024    # RLIMIT_AS
  file_mb: int = 16        # RLIMIT_FSIZE: any file written, stdout, stderr and results included
  processes: int = 8       # RLIMIT_NPROC (threads count too)
  open_files: int = 64     # RLIMIT_NOFILE


@dataclass(frozen=True)
class RunResult:
  returncode: int    # negative: killed by that signal
  stdout: str
  stderr: str
  timed_out: bool
  finished: bool     # every source ran to its end and every call was evaluated (as the boot reports)
  values: list       # per call: [True, repr of a plain value] or [False, exception type name]


def set_mode(mode: str) -> None:
  """"bwrap" (the default: refuse to run without kernel isolation) or "unsafe" (rlimits + audit hook)."""
  global _mode
  if mode not in MODES:
    raise ValueError(f"rewards.sandbox={mode!r}; use 'bwrap' (kernel namespaces, the default) or 'unsafe'.")
  _mode = mode


def mode() -> str:
  return _mode


def _interpreter() -> str:
  """The base interpreter (a venv's python is a symlink into it, with a pyvenv.cfg the sandbox need not see)."""
  return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.cache
def _mounts() -> tuple[str, ...]:
  """bwrap arguments for the read-only view: libraries, the interpreter, its stdlib without site-packages."""
  args: list[str] = []
  for path in ("/usr/lib", "/usr/lib64"):
    if os.path.isdir(path):
      args += ["--ro-bind", path, path]
  for path in ("/lib", "/lib32", "/lib64"):
    if os.path.islink(path):
      args += ["--symlink", os.readlink(path), path]
    elif os.path.isdir(path):
      args += ["--ro-bind", path, path]
  stdlib = os.path.realpath(sysconfig.get_paths(vars={"base": sys.base_prefix})["stdlib"])
  libdir = os.path.realpath(sysconfig.get_config_var("LIBDIR") or stdlib)
  for path in sorted({libdir, stdlib, _interpreter()}, key=len):
    args += ["--ro-bind", path, path]
  base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
  hidden = {os.path.realpath(sysconfig.get_paths(vars=base)[kind]) for kind in ("purelib", "platlib")}
  hidden |= {str(p) for p in Path("/usr/lib").glob("python3*/dist-packages")}
  for path in sorted(hidden):
    if os.path.isdir(path):
      args += ["--tmpfs", path]
  return tuple(args)


def bwrap_command(info_fd: int, seccomp_fd: int | None = None) -> list[str]:
  """The bwrap prefix; `info_fd` receives {"child-pid": <the namespace's init, as seen from here>};
  `seccomp_fd` holds a filter (seccomp.py) to apply to the program."""
  return ["bwrap", *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
          "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
          "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL", "--hostname", "sandbox",
          "--clearenv", "--setenv", "HOME", WORK, "--setenv", "TMPDIR", WORK, "--setenv", "LANG", "C.UTF-8",
          *_mounts(), "--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", WORK,
          "--remount-ro", "/", "--chdir", WORK, "--info-fd", str(info_fd)]


@functools.cache
def unavailable_reason() -> str | None:
  """Why bwrap sandboxes cannot start here (probed once per process, with a real run), or None."""
  if shutil.which("bwrap") is None:
    return "bwrap is not installed"
  try:
    probe = _execute([("probe.py", "")], (), "", Limits(wall_s=30.0), True, isolated=True)
  except OSError as error:
    return f"bwrap failed to start: {error}"
  if not probe.finished:
    lines = probe.stderr.strip().splitlines()
    return f"bwrap failed: {lines[-1] if lines else f'exit code {probe.returncode}'}"
  return None


def require() -> None:
  """Raises SandboxUnavailable (one line naming the fix) unless code can run isolated or the user opted out."""
  reason = unavailable_reason() if _mode == "bwrap" else None
  if reason:
    raise SandboxUnavailable(f"code verification refuses to run: {reason}; {FIX}.")


@functools.cache
def _adopt_orphans() -> None:
  """bwrap exits without reaping the namespace's init: as a subreaper this process gets and reaps it."""
  LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1)


def _reap(init: int) -> None:
  try:
    signal.pidfd_send_signal(init, signal.SIGKILL)
  except ProcessLookupError:
    pass
  try:
    os.waitid(os.P_PIDFD, init, os.WEXITED)
  except ChildProcessError:  # bwrap reaped it, or this process is not its subreaper
    pass


def _in_child() -> None:
  """preexec_fn for the unsafe mode (between fork and exec; reward workers are single-threaded): die with
  the parent, no core. Without it, subprocess can use vfork; bwrap's --die-with-parent covers the rest."""
  LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _memfile(name: str, content: bytes = b"") -> int:
  fd = os.memfd_create(name)  # close-on-exec: only pass_fds hands it on
  os.write(fd, content)
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _read(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  with open(fd, "rb", closefd=False) as file:
    return file.read().decode("utf-8", "replace")


def _init_pidfd(info_read: int, timeout_s: float) -> int | None:
  """A pidfd of the namespace's init, from bwrap's --info-fd (None if it is already gone)."""
  data = b""
  while select.select([info_read], [], [], timeout_s)[0]:
    chunk = os.read(info_read, 4096)
    if not chunk:
      break
    data += chunk
  try:
    return os.pidfd_open(int(json.loads(data)["child-pid"]))
  except (OSError, ValueError, KeyError, TypeError):
    return None


def run_python(sources: list[tuple[str, str]], *, calls: list[str] = (), stdin: str = "",
               limits: Limits = Limits(), audit_hook: bool = True) -> RunResult:
  """Runs `sources` ([(file name, code)], in order, in one namespace), then evaluates each expression of
  `calls` there; stdin is `stdin`. Raises SandboxUnavailable where bwrap cannot run (and mode is not unsafe).
  `audit_hook=False` leaves the kernel alone in the way (tests show it holds by itself)."""
  require()
  return _execute(sources, calls, stdin, limits, audit_hook, isolated=_mode == "bwrap")


def _execute(sources, calls, stdin: str, limits: Limits, audit_hook: bool, *, isolated: bool) -> RunResult:
  _adopt_orphans()
  job = json.dumps({"sources": sources, "calls": list(calls), "limits": asdict(limits),
                    "audit_hook": audit_hook}).encode()
  files = [("job", job), ("stdin", stdin.encode()), ("stdout", b""), ("stderr", b""), ("results", b"")]
  if isolated and SECCOMP is not None:
    files.append(("seccomp", SECCOMP))
  fds = {name: _memfile(name, content) for name, content in files}
  info_read, info_write = os.pipe()
  workdir = None
  try:
    boot = [_interpreter(), "-I", "-S", "-B", "-c", BOOT_SOURCE, str(fds["job"]), str(fds["results"])]
    if isolated:
      command, cwd, env = [*bwrap_command(info_write, fds.get("seccomp")), *boot], "/", {"PATH": "/usr/bin:/bin"}
    else:
      workdir = tempfile.TemporaryDirectory(prefix="mcpo_sandbox_", ignore_cleanup_errors=True)
      command, cwd = boot, workdir.name
      env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
    passed = tuple(fds[name] for name in ("job", "results", "seccomp") if name in fds) + (info_write,)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=fds["stdin"], stdout=fds["stdout"],
                               stderr=fds["stderr"], pass_fds=passed, start_new_session=True,
                               preexec_fn=None if isolated else _in_child)  # bwrap: --die-with-parent
    os.close(info_write)
    info_write = None
    exited = os.pidfd_open(process.pid)  # readable once bwrap (or, unsafe, the boot) exits
    init = _init_pidfd(info_read, limits.wall_s) if isolated else None
    try:
      timed_out = not select.select([exited], [], [], max(0.0, started + limits.wall_s - time.monotonic()))[0]
      if init is not None and timed_out:
        try:
          signal.pidfd_send_signal(init, signal.SIGKILL)  # the kernel kills the PID namespace; then bwrap exits
        except ProcessLookupError:
          pass
        select.select([exited], [], [], 2.0)
      os.killpg(process.pid, signal.SIGKILL)  # unreaped, the leader keeps the group id ours
      process.wait()
      if init is not None:
        _reap(init)  # returns once the namespace is gone: init exits last
    finally:
      for fd in (exited, *([init] if init is not None else [])):
        os.close(fd)
    stdout, stderr, results = _read(fds["stdout"]), _read(fds["stderr"]), _read(fds["results"])
  finally:
    for fd in (*fds.values(), info_read, *([info_write] if info_write is not None else [])):
      os.close(fd)
    if workdir is not None:
      workdir.cleanup()
  try:
    report = json.loads(results)
    values, done = list(report["values"]), report["done"] is True
  except (ValueError, KeyError, TypeError):
    values, done = [], False
  finished = not timed_out and process.returncode == 0 and done and len(values) == len(calls)
  return RunResult(process.returncode, stdout, stderr[-4000:], timed_out, finished, values)
