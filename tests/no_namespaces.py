"""Run a command on a host that refuses new namespaces: ``python no_namespaces.py CMD...``.

A seccomp filter makes unshare(2) fail with EPERM for this process and everything it
starts, as container runtimes' default profiles and distributions that restrict user
namespaces do. Used to check what pytest-umtt does where it cannot confine machines.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
NR_UNSHARE = 272  # x86_64
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1
BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
ARCH_OFFSET, NR_OFFSET = 4, 0  # struct seccomp_data


def _instruction(code: int, jump_true: int, jump_false: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jump_true, jump_false, k)


def refuse_unshare() -> None:
    """Install the filter: unshare(2) fails with EPERM, every other call is allowed."""
    program = b"".join([
        _instruction(BPF_LD_W_ABS, 0, 0, ARCH_OFFSET),
        _instruction(BPF_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        _instruction(BPF_LD_W_ABS, 0, 0, NR_OFFSET),
        _instruction(BPF_JEQ_K, 0, 1, NR_UNSHARE),
        _instruction(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM),
        _instruction(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])
    filters = ctypes.create_string_buffer(program)
    fprog = struct.pack("HxxxxxxP", len(program) // 8, ctypes.addressof(filters))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_char_p(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    refuse_unshare()
    os.execvp(sys.argv[1], sys.argv[1:])
