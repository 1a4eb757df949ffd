"""The program that runs inside the sandbox: `python -I -S -B -c <this file> JOB_FD RESULTS_FD`.

It reads the job (rlimits, source files to run in one namespace, expressions to evaluate) from JOB_FD,
applies the rlimits, installs an audit hook, runs the sources, evaluates each call and writes
{"values": [...], "done": true} to RESULTS_FD. A value comes back as its repr only if it is built from
plain types (int, float, str, bytes, bool, None, list, tuple, dict, set); the parent
parses it with ast.literal_eval and compares it there with an expected value that never
enters this process, so an object whose `__eq__` always says True has nothing to fool.

The audit hook is a second layer under the kernel's namespaces (and the only one in "unsafe" mode):
it refuses sockets, new processes, signals, ctypes, sub-interpreters, hand-built code objects, raising
the limits, writes outside the work directory and reading /proc or /sys. Every name it uses is bound
when it is installed, so a candidate that rebinds this module's globals (it is sys.modules["__main__"])
does not switch it off. Interpreter bugs can still bypass it; the namespaces are what hold.
Standard library only: it runs with site-packages disabled.
"""

import json
import os
import resource
import sys

DENIED_EVENTS = frozenset({
    # processes and signals
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    # raising the limits again; bytecode built by hand (a way into interpreter memory)
    "resource.setrlimit", "resource.prlimit", "code.__new__", "marshal.loads", "marshal.load",
})
DENIED_PREFIXES = ("socket.", "ctypes.")
DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes", "ctypes", "_xxsubinterpreters", "_interpreters",
                            "_xxinterpchannels", "_xxinterpqueues"})
# audit event -> positions of its path arguments; each must lie inside the work directory
PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (1,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
LIMITS = {"cpu_s": (resource.RLIMIT_CPU, 1), "memory_mb": (resource.RLIMIT_AS, 2**20),
          "file_mb": (resource.RLIMIT_FSIZE, 2**20), "processes": (resource.RLIMIT_NPROC, 1),
          "open_files": (resource.RLIMIT_NOFILE, 1)}
PLAIN_LEAVES = (int, float, str, bytes, bool, type(None))


def make_hook(root, realpath=os.path.realpath, fsdecode=os.fsdecode, sep=os.sep, denied_events=DENIED_EVENTS,
              denied_prefixes=DENIED_PREFIXES, denied_imports=DENIED_IMPORTS, path_events=dict(PATH_EVENTS),
              write_flags=WRITE_FLAGS, isinstance=isinstance, bool=bool, all=all, PermissionError=PermissionError):
  def inside(path) -> bool:
    if isinstance(path, int):  # an already open file descriptor
      return True
    real = realpath(fsdecode(path))
    return real == root or real.startswith(root + sep)

  def hook(event: str, args: tuple) -> None:
    denied = event in denied_events or event.startswith(denied_prefixes)
    if event == "import":
      denied = args[0] in denied_imports
    elif event == "open":
      path, _, flags = args
      if path is not None and not isinstance(path, int):
        real = realpath(fsdecode(path))
        denied = real.startswith(("/proc", "/sys")) or (bool((flags or 0) & write_flags) and not inside(path))
    elif event in path_events:
      denied = not all(inside(args[i]) for i in path_events[event] if args[i] is not None)
    if denied:
      raise PermissionError(f"sandbox: {event} is not allowed")

  return hook


def plain(value, depth=0, type=type, leaves=PLAIN_LEAVES, all=all) -> bool:
  """Built only from plain types (exact types: a subclass of int may override __eq__ or __repr__)."""
  kind = type(value)
  if kind in leaves:
    return True
  if depth > 64:
    return False
  if kind in (list, tuple, set, frozenset):
    return all(plain(item, depth + 1) for item in value)
  if kind is dict:
    return all(plain(key, depth + 1) and plain(item, depth + 1) for key, item in value.items())
  return False


def main() -> None:
  job_fd, results_fd = int(sys.argv[1]), int(sys.argv[2])
  with open(job_fd, encoding="utf-8") as file:  # closes the job's descriptor
    job = json.load(file)
  for name, (kind, scale) in LIMITS.items():
    value = job["limits"][name] * scale
    resource.setrlimit(kind, (value, value))
  resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
  programs = [compile(source, name, "exec") for name, source in job["sources"]]
  calls = [compile(call, "<test>", "eval") for call in job["calls"]]
  results = open(results_fd, "w", encoding="utf-8")
  dumps, flush, repr_, plain_, audit = json.dumps, sys.stdout.flush, repr, plain, job["audit_hook"]
  del job
  if audit:
    sys.addaudithook(make_hook(os.path.realpath(os.getcwd())))
  namespace = {"__name__": "__main__", "__builtins__": __builtins__}
  for program in programs:
    exec(program, namespace)
  values = []
  for call in calls:
    try:
      value = eval(call, namespace)
      values.append([True, repr_(value)] if plain_(value) else [False, "not a plain value"])
    except BaseException as error:  # noqa: BLE001 - the call failed (SystemExit included): that case fails
      values.append([False, type(error).__name__])
  flush()
  results.write(dumps({"values": values, "done": True}))
  results.flush()


if __name__ == "__main__":
  main()
