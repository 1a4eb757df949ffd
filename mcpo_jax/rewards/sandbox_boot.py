"""The program that runs inside the sandbox: `python -I -S sandbox_boot.py job.json`.

It reads the job (source files to run in one namespace, and an end marker), deletes the job file,
installs an audit hook, runs the sources, and only if every one of them finished writes the end
marker to stdout. The marker is a per-run secret, so a program that exits early (`sys.exit(0)`,
`os._exit(0)`) or prints a fake success line, the reward hacks seen in practice, does not pass. It is
not hidden from a program that walks the interpreter's frames: refusing `sys._getframe` would break
namedtuple, typing and enum. Standard library only: it runs with site-packages disabled.
"""

import json
import os
import sys

DENIED_EVENTS = {
    # processes and signals
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
    # raising the limits again (root may)
    "resource.setrlimit", "resource.prlimit",
}
DENIED_PREFIXES = ("socket.", "ctypes.")
DENIED_IMPORTS = {"_posixsubprocess", "_ctypes", "ctypes"}
# audit event -> positions of its path arguments; each must lie inside the work directory
PATH_EVENTS = {
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (0, 1), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (1,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def make_hook(root: str):
  def inside(path) -> bool:
    if isinstance(path, int):  # an already open file descriptor
      return True
    real = os.path.realpath(os.fsdecode(path))
    return real == root or real.startswith(root + os.sep)

  def hook(event: str, args: tuple) -> None:
    denied = event in DENIED_EVENTS or event.startswith(DENIED_PREFIXES)
    if event == "import":
      denied = args[0] in DENIED_IMPORTS
    elif event == "open":
      path, _, flags = args
      if path is not None and not isinstance(path, int):
        real = os.path.realpath(os.fsdecode(path))
        denied = real.startswith(("/proc", "/sys")) or (bool((flags or 0) & WRITE_FLAGS) and not inside(path))
    elif event in PATH_EVENTS:
      denied = not all(inside(args[i]) for i in PATH_EVENTS[event] if args[i] is not None)
    if denied:
      raise PermissionError(f"sandbox: {event} is not allowed")

  return hook


def main() -> None:
  job_path = sys.argv[1]
  with open(job_path, encoding="utf-8") as file:
    job = json.load(file)
  os.remove(job_path)
  programs = [compile(source, name, "exec") for name, source in job["sources"]]
  marker, write, flush = job["marker"].encode(), os.write, sys.stdout.flush
  del job
  sys.addaudithook(make_hook(os.path.realpath(os.getcwd())))
  namespace = {"__name__": "__main__", "__builtins__": __builtins__}
  for program in programs:
    exec(program, namespace)
  flush()
  if marker:
    write(1, b"\n" + marker + b"\n")


if __name__ == "__main__":
  main()
