"""A seccomp filter for the sandbox (bwrap --seccomp FD): refuses, with EPERM, new processes (threads
are allowed) and the system calls that reach kernel code an unprivileged program has no business in,
the usual way from a user namespace to a kernel bug: ptrace and cross-process memory, keyrings, bpf,
perf events, userfaultfd, io_uring, namespaces and mounts, module and kexec loading, personality.
Other ABIs on the same kernel (i386 via int 0x80, x32) are killed outright, since their numbers differ.

A classic BPF program over `struct seccomp_data` (nr at offset 0, arch at 4), built here; x86-64 only
(`program()` is None elsewhere and the sandbox runs without it).
"""

from __future__ import annotations

import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
CLONE_THREAD = 0x00010000
LOAD_WORD, JUMP_EQUAL, JUMP_AT_LEAST, JUMP_SET, RETURN = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, KILL_PROCESS, ERRNO_EPERM, ERRNO_ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
NR, ARCH, ARG0 = 0, 4, 16  # offsets in struct seccomp_data (ARG0: the low half of args[0], little-endian)
CLONE, CLONE3 = 56, 435
DENIED_X86_64 = {
    "fork": 57, "vfork": 58,  # and clone without CLONE_THREAD: no new processes, threads only
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "add_key": 248, "request_key": 249,
    "keyctl": 250, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166,
    "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
    "fsmount": 432, "fspick": 433, "mount_setattr": 442, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "personality": 135,
}


def _assemble(ops: list[tuple]) -> bytes:
  """[(label or None, code, k, jump-if-true label, jump-if-false label)] -> struct sock_filter array."""
  where = {op[0]: index for index, op in enumerate(ops) if op[0]}
  out = []
  for index, (_, code, k, true, false) in enumerate(ops):
    jt, jf = (where[target] - index - 1 if target else 0 for target in (true, false))
    out.append(struct.pack("=HBBI", code, jt, jf, k))
  return b"".join(out)


def program() -> bytes | None:
  """The filter as bwrap reads it (an array of struct sock_filter), or None off x86-64.

  Processes: fork, vfork and clone without CLONE_THREAD get EPERM; clone3 gets ENOSYS, so libc falls
  back to clone for threads. Without new processes, a fork bomb has nothing to multiply, whichever uid
  the sandbox has outside (the kernel does not apply RLIMIT_NPROC to root's processes)."""
  if platform.machine() != "x86_64":
    return None
  ops = [(None, LOAD_WORD, ARCH, None, None), (None, JUMP_EQUAL, AUDIT_ARCH_X86_64, "native", None),
         (None, RETURN, KILL_PROCESS, None, None),
         ("native", LOAD_WORD, NR, None, None), (None, JUMP_AT_LEAST, X32_SYSCALL_BIT, "deny", None),
         (None, JUMP_EQUAL, CLONE, "clone", None), (None, JUMP_EQUAL, CLONE3, "enosys", None)]
  ops += [(None, JUMP_EQUAL, number, "deny", None) for number in sorted(DENIED_X86_64.values())]
  ops += [(None, RETURN, ALLOW, None, None),
          ("clone", LOAD_WORD, ARG0, None, None), (None, JUMP_SET, CLONE_THREAD, "allow", "deny"),
          ("allow", RETURN, ALLOW, None, None), ("deny", RETURN, ERRNO_EPERM, None, None),
          ("enosys", RETURN, ERRNO_ENOSYS, None, None)]
  return _assemble(ops)
