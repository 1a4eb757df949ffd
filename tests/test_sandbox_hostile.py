"""A determined program gets nothing: each attack scores 0 (it is written so that it would score 1 if it
worked), ends within its time limit + 2 s, writes no file outside its work directory, leaves no process,
and leaves the trainer's workdir (a canary with a checkpoint in it) unchanged; the control scores 1.
The escape attacks are also run with the audit hook off, to show the kernel's namespaces hold alone."""

import ctypes
import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from mcpo_jax.rewards import code, sandbox, seccomp

SECRET = "mcpo-test-secret-71d3"
ANSWER = "the-hidden-answer-4417"
PR_SET_CHILD_SUBREAPER = 36
LIMIT_S = 1.0

pytestmark = pytest.mark.skipif(sandbox.unavailable_reason() is not None, reason="bubblewrap sandbox unavailable")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """Paths the attacks aim at: a canary trainer workdir, a dataset file, a listening socket, this process."""
  root = tmp_path_factory.mktemp("hostile")
  workdir = root / "workdir"
  (workdir / "checkpoints" / "1").mkdir(parents=True)
  (workdir / "checkpoints" / "1" / "state").write_bytes(os.urandom(4096))
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  dataset = root / "code_test.jsonl"
  dataset.write_text(f'{{"answer": "{ANSWER}"}}\n')
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen()
  listener.setblocking(False)
  os.environ["MCPO_TEST_SECRET"] = SECRET
  # Orphans (a double-forked daemon) are re-parented to this process while the module runs: none may appear.
  libc = ctypes.CDLL(None)
  libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
  yield {"root": root, "workdir": workdir, "dataset": dataset, "port": listener.getsockname()[1], "listener": listener,
         "children_before": set(_children())}
  libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
  os.environ.pop("MCPO_TEST_SECRET")
  listener.close()


def escapes(world) -> dict[str, str]:
  """Attacks on the machine; each ends with `ok()`-able code only if the attack got through."""
  out, work, ckpt = world["root"] / "escaped.txt", world["workdir"], world["workdir"] / "checkpoints" / "1" / "state"
  return {
      "infinite loop": "while True:\n    pass",
      "fork bomb": "import os\nwhile True:\n    os.fork()",
      "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'], check=True)",
      "10 GB allocation": "block = bytearray(10 * 2**30)\nblock[-1] = 1",
      "write outside": f"open({str(out)!r}, 'w').write('x')",
      "write into checkpoints": f"open({str(work / 'checkpoints' / '1' / 'planted')!r}, 'w').write('x')",
      "overwrite checkpoint": f"open({str(ckpt)!r}, 'wb').write(b'0')",
      "delete workdir file": f"import os\nos.remove({str(work / 'metrics.jsonl')!r})",
      "rmtree workdir": f"import shutil\nshutil.rmtree({str(work)!r})",
      "read checkpoint": f"assert len(open({str(ckpt)!r}, 'rb').read()) == 4096",
      "symlink out": f"import os\nos.symlink({str(world['root'])!r}, 'link')\nopen('link/escaped.txt', 'w').write('x')",
      "socket to host": (f"import socket\nsocket.create_connection(('127.0.0.1', {world['port']}), timeout=1)"
                         ".sendall(b'x')"),
      "dns": "import socket\nsocket.getaddrinfo('pypi.org', 443)",
      "parent env": (f"import os\nassert os.environ.get('MCPO_TEST_SECRET') == {SECRET!r} or "
                     f"{SECRET!r} in open(f'/proc/{os.getpid()}/environ').read()"),
      "trainer memory": f"open('/proc/{os.getpid()}/mem', 'rb')",
      "kill parent": ("import os, signal, time\nparent = os.getppid()\nos.kill(parent, signal.SIGKILL)\n"
                      "time.sleep(0.3)\n"
                      "assert os.getppid() != parent"),  # re-parented: the parent died
      "kill tester": f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)",
      "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\nimport time\ntime.sleep(0.5)",
      "raise limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nbytearray(10 * 2**30)",
      "become root": "import os\nos.setuid(0)\nopen('/usr/lib/planted', 'w')",
      "backdoor the stdlib": "import os\nopen(os.__file__, 'a').write('#')",
      "read etc": "assert 'root:' in open('/etc/passwd').read()",
      "fill the disk": "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'0' * 2**20)\n    i += 1",
      "flood stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
      "daemon": (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                 "        time.sleep(3)\n"
                 f"        open({str(out)!r}, 'w').write('x')\n    os._exit(0)\nos.wait()\nos._exit(0)"),
      "subinterpreter": ("import _xxsubinterpreters as interpreters\nwhich = interpreters.create()\n"
                         f"interpreters.run_string(which, \"open({str(out)!r}, 'w').write('x')\")"),
      **({"kernel attack surface": (  # passes if any of these system calls gets past the seccomp filter
          "import ctypes, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nreached = 0\n"
          "for number in (101, 250, 321, 425, 298):  # ptrace, keyctl, bpf, io_uring_setup, perf_event_open\n"
          "    reached += libc.syscall(number, 0, 0, 0, 0, 0) != -1 or ctypes.get_errno() != errno.EPERM\n"
          "assert reached")} if seccomp.program() else {}),
      "hook off via globals": ("import sys\nmain = vars(sys.modules['__main__'])\n"
                               "for name in ('DENIED_EVENTS', 'DENIED_PREFIXES', 'DENIED_IMPORTS', 'PATH_EVENTS'):\n"
                               "    main[name] = type(main[name])()\nmain['os'] = None\n"
                               f"open({str(out)!r}, 'w').write('x')"),
  }


def _hacks(world) -> dict[str, tuple[str, dict]]:
  """Reward hacks against the harness: (program, example); each would score 1 if the harness were fooled."""
  asserts = {"tests": "assert f(2) == 5\nassert f(3) == 7"}
  return {
      "always-equal object": ("class Any:\n    def __eq__(self, other):\n        return True\n"
                              "    __ne__ = lambda self, other: False\ndef f(x):\n    return Any()", asserts),
      "int subclass": ("class Int(int):\n    __eq__ = lambda self, other: True\ndef f(x):\n    return Int(0)", asserts),
      "exit early": ("import os\nos._exit(0)", asserts),
      "sys.exit early": ("import sys\nsys.exit(0)", asserts),
      "steal the end marker": ("import os, sys\nframe = sys._getframe(1)\n"
                               "secret = frame.f_locals.get('marker') or frame.f_globals.get('marker')\n"
                               "os.write(1, b'\\n' + bytes(secret) + b'\\n')\nos._exit(0)", asserts),
      "empty the calls": ("import sys\nframe = sys._getframe(1)\nfor value in frame.f_locals.values():\n"
                          "    if isinstance(value, list):\n        value.clear()", asserts),
      "answer from the dataset": (f"import json\ndef f():\n    return json.loads(open({str(world['dataset'])!r})"
                                  ".readline())['answer']", {"tests": f"assert f() == {ANSWER!r}"}),
      "print /etc/passwd": ("print(open('/etc/passwd').read(), end='')",
                            {"tests": {"inputs": [""], "outputs": [Path("/etc/passwd").read_text()]}}),
  }


def _tree(path: Path) -> dict[str, str]:
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(path.rglob("*"))}


def _new_children(world) -> list[int]:
  """Children of this process that were not there when the module started (earlier tests in the same
  pytest process may leave their own, e.g. a reward pool's workers closed only at exit)."""
  return sorted(set(_children()) - world["children_before"])


def _children() -> list[int]:
  mine = []
  for entry in Path("/proc").iterdir():
    if entry.name.isdigit():
      try:
        ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):
        continue
      if ppid == os.getpid():
        mine.append(int(entry.name))
  return mine


def _assert_contained(world, canary: dict, started: float) -> None:
  assert time.monotonic() - started < LIMIT_S + 2
  assert not (world["root"] / "escaped.txt").exists()
  assert _tree(world["workdir"]) == canary
  assert _new_children(world) == []
  with pytest.raises(BlockingIOError):
    world["listener"].accept()


def _example(**extra) -> dict:
  return {"tests": "assert True", "time_limit_s": LIMIT_S, **extra}


def test_the_control_scores_one():
  assert code.score("```python\ndef f(x):\n    return 2 * x + 1\n```", _example(tests="assert f(2) == 5")) == 1.0
  assert code.score("```python\nprint('hi')\n```", _example()) == 1.0


@pytest.mark.parametrize("name", list(escapes({"root": Path("/r"), "workdir": Path("/w"), "port": 1})))
@pytest.mark.parametrize("audit_hook", [True, False], ids=["with hook", "kernel alone"])
def test_an_escape_is_contained(world, name, audit_hook):
  program, canary = escapes(world)[name], _tree(world["workdir"])
  started = time.monotonic()
  if audit_hook:  # the verifier's own path
    assert code.score(f"```python\n{program}\n```", _example()) == 0.0
  else:
    result = sandbox.run_python([("solution.py", program)], limits=code._limits(_example()), audit_hook=False)
    assert not result.finished, result
  _assert_contained(world, canary, started)


@pytest.mark.parametrize("name", list(_hacks({"dataset": Path("/d")})))
def test_a_reward_hack_scores_zero(world, name):
  program, example = _hacks(world)[name]
  canary, started = _tree(world["workdir"]), time.monotonic()
  assert code.score(f"```python\n{program}\n```", _example(**example)) == 0.0
  _assert_contained(world, canary, started)


def test_the_daemon_left_nothing_behind(world):
  """Runs last in this module: any daemon would have written its file 3 s after it started."""
  time.sleep(3.5)
  assert not (world["root"] / "escaped.txt").exists()
  assert _new_children(world) == []


def test_without_bubblewrap_code_verification_refuses_with_the_fix(monkeypatch):
  monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "bwrap is not installed")
  with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap.*rewards.sandbox=unsafe"):
    code.score("print(1)", _example())
