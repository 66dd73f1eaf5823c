"""Host-level confinement of a UML process: it may change its machine directory, nothing else.

Guest root can mount hostfs with any host path (or remount a hostfs root read-write), and
UML then writes host files as the user running pytest. So each UML process starts in a
private mount namespace in which every mount is read-only, except the machine directory
(bound read-write) and a private tmpfs on /dev/shm for UML's memory file. As root, a
mount namespace is enough; as another user, a user namespace comes with it (the user's
own uid mapped to itself, so files UML makes are still the user's). The mounts are made
between fork and exec (:func:`confine_to`); UML itself keeps no extra privilege.

What remains: the guest can read what the user running pytest can read, and can use the
network as that user (UML has no network device unless a test gives it one).
"""

from __future__ import annotations

import ctypes
import functools
import os
import tempfile
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV = 0x1, 0x2, 0x4
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # x86_64
SHM = "/dev/shm"
PROBLEM_BYTES = 1000


class MountAttr(ctypes.Structure):
    """``struct mount_attr`` of mount_setattr(2)."""

    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc().mount(None if source is None else source.encode(), target.encode(),
                         None if fstype is None else fstype.encode(), ctypes.c_ulong(flags),
                         None if data is None else data.encode()), f"mount {target}")


def _enter_namespaces() -> None:
    libc = _libc()
    if os.geteuid() == 0:
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER|CLONE_NEWNS)")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")


def confine_to(writable: Path) -> None:
    """In the child, before exec: a private mount namespace where only ``writable`` (and
    a private /dev/shm) can be written."""
    _enter_namespaces()
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY)
    _check(_libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE,
                           ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr /")
    target = str(writable)
    _mount(target, target, None, MS_BIND)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    os.chdir(target)  # the working directory must be the new, writable mount
    if os.path.isdir(SHM):
        _mount("umtt-shm", SHM, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


@functools.cache
def confinement_problem() -> str | None:
    """Why this host does not let a child confine itself, or None when it does (tried
    once, in a throwaway child that reports the failing step through a pipe)."""
    probe = Path(tempfile.gettempdir())
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and its status
        os.close(reader)
        try:
            confine_to(probe)
            os._exit(0)
        except BaseException as exc:
            os.write(writer, str(exc).encode(errors="replace")[:PROBLEM_BYTES])
            os._exit(1)
    os.close(writer)
    with os.fdopen(reader, "rb") as said:
        reason = said.read(PROBLEM_BYTES).decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return reason or f"the probe child ended with status {status}"


def confinement_available() -> bool:
    """Whether this host lets a child confine itself."""
    return confinement_problem() is None


def refusal(problem: str) -> str:
    """What to tell a user whose host refuses confinement, and the two ways on."""
    how = ("" if os.geteuid() == 0 else
           " (distributions that restrict user namespaces for non-root users: "
           "sysctl kernel.apparmor_restrict_unprivileged_userns=0, or "
           "kernel.unprivileged_userns_clone=1)")
    return (f"machines cannot be confined on this host: {problem}. Unconfined, a guest "
            f"can write any file the user running pytest can write. Allow the namespaces"
            f"{how}, or accept that risk with --umtt-confine=off "
            f"(Simulation(confine=False))")
