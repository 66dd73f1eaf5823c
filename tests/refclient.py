"""A reference client: the UML kernel's side of the time-travel protocol, for tests.

It follows arch/um/kernel/time.c (Linux 6.12): the START handshake with fds, shared
memory when the ACK brings a version-2 memfd, free-running below ``free_until``, and
tolerance of FREE_UNTIL or BROADCAST arriving before the ACK it waits for (§4).
Low-level ``send``/``recv`` serve scenario tests driven from one thread; ``sleep`` and
``run_sleeps`` act like a kernel and serve threads, property tests and benchmarks.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from array import array
from collections.abc import Callable

from pytest_umtt.wire import (
    MESSAGE_SIZE,
    NO_ID,
    S64_MAX,
    SHM_HEADER_SIZE,
    SHM_VERSION,
    Capability,
    ClientFlag,
    Message,
    Op,
    SharedMemory,
    shm_size,
)


class KernelPanic(AssertionError):
    """What the kernel would panic with (K:50-59, 146-149, 218-226)."""


class RefClient:
    """One kernel-like client on a connected socket. ``take_shm=False`` makes it decline
    the offered memory, as a kernel whose mmap failed or a third-party participant does:
    it leaves capa at 0 and speaks messages only (§7.4)."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0,
                 take_shm: bool = True) -> None:
        self.sock = sock
        self.take_shm = take_shm
        self.sock.settimeout(timeout)
        self.seq = 0
        self.id = 0
        self.time = 0
        self.offset = 0
        self.fds: list[int] = []
        self.fds_received = 0
        self.shm: SharedMemory | None = None
        self._map: mmap.mmap | None = None
        self.free_until: int | None = None
        self.broadcasts: list[int] = []
        self.runs: list[int] = []
        self.received: list[Message] = []
        # Single-threaded tests let the calendar run here, after each message this client
        # answers while it waits for an ACK (a FREE_UNTIL, say).
        self.after_reply: Callable[[], None] | None = None

    @classmethod
    def connect(cls, path: str, timeout: float = 10.0) -> RefClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout)

    # --- raw messages -----------------------------------------------------------

    def send(self, op: int, time: int = 0, seq: int | None = None) -> int:
        if seq is None:
            self.seq += 1
            seq = self.seq
        self.sock.sendall(Message(op, seq, time).pack())
        return seq

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> Message:
        data = self.sock.recv(MESSAGE_SIZE)
        if len(data) != MESSAGE_SIZE:
            raise EOFError(f"read {len(data)} bytes")
        message = Message.unpack(data)
        self.received.append(message)
        return message

    def recv_start_ack(self) -> Message:
        data, ancdata, _, _ = self.sock.recvmsg(MESSAGE_SIZE, socket.CMSG_SPACE(8))
        if len(data) != MESSAGE_SIZE:
            raise EOFError(f"read {len(data)} bytes")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds = list(fds)
        message = Message.unpack(data)
        self.received.append(message)
        self.id = message.time & 0xFFFF
        return message

    def ack(self, message: Message, time: int = 0) -> None:
        self.send(Op.ACK, time, seq=message.seq)

    def expect_ack(self, seq: int) -> Message:
        """Read until the ACK of ``seq``, serving what the kernel serves meanwhile."""
        while True:
            message = self.recv()
            if message.op == Op.ACK:
                if message.seq != seq:
                    raise AssertionError(f"ACK seq {message.seq} != {seq}")
                return message
            self._serve(message)

    def _serve(self, message: Message) -> None:
        if message.op == Op.FREE_UNTIL:
            self.free_until = message.time
        elif message.op == Op.BROADCAST:
            self.broadcasts.append(message.time)
        elif message.op == Op.RUN:
            raise AssertionError("RUN while not waiting")
        self.ack(message)
        if self.after_reply is not None:
            self.after_reply()

    # --- kernel behaviour ---------------------------------------------------------

    def start(self, start_id: int = NO_ID) -> Message:
        """START, then attach shared memory if the ACK offers version 2 (K:75-108)."""
        seq = self.send(Op.START, start_id)
        ack = self.recv_start_ack()
        assert ack.op == Op.ACK and ack.seq == seq, ack
        self._attach_shm()
        return ack

    def _attach_shm(self) -> None:
        if not self.fds:
            return
        memfd, logfd = self.fds
        try:
            header = mmap.mmap(memfd, SHM_HEADER_SIZE)
            version, length = struct.unpack_from("=II", header, 0)
            header.close()
            if self.take_shm and version == SHM_VERSION and length >= shm_size(self.id + 1):
                self._map = mmap.mmap(memfd, length)
                self.shm = SharedMemory(self._map)
                self.offset = self.shm.current_time
                entry = self.shm.entry(self.id)
                entry.capa = entry.capa | Capability.TIME_SHARE
        finally:
            os.close(memfd)
            os.close(logfd)
            self.fds_received, self.fds = len(self.fds), []

    def _runner_shares(self) -> bool:
        assert self.shm is not None
        running = self.shm.entry(self.shm.running_id)
        return bool(running.capa & Capability.TIME_SHARE)

    def request(self, when: int) -> None:
        """Ask to run at local time ``when`` (K:253-294)."""
        if self.shm is not None and self._runner_shares():
            entry = self.shm.entry(self.id)
            entry.flags = entry.flags | ClientFlag.REQ_RUN
            absolute = when + self.offset
            entry.req_time = absolute
            self.shm.free_until = min(self.shm.free_until, absolute)
            return
        self.expect_ack(self.send(Op.REQUEST, when))

    def wait(self) -> int:
        """WAIT, then serve messages until RUN; returns the granted time (K:335-362)."""
        if self.shm is None:
            self.free_until = None
        seq = self.send(Op.WAIT, 2**64 - 1)
        if self.shm is None:
            self.expect_ack(seq)
        return self.until_run()

    def until_run(self) -> int:
        """Serve messages until RUN (the rest of K:335-362); the granted time."""
        while True:
            message = self.recv()
            if message.op == Op.RUN:
                self.set_time(message.time)
                self.runs.append(message.time)
                if self.shm is not None:
                    entry = self.shm.entry(self.id)
                    entry.flags = entry.flags & ~ClientFlag.REQ_RUN
                else:
                    self.ack(message)
                return message.time
            if message.op == Op.ACK:
                raise AssertionError(f"unexpected ACK while waiting: {message}")
            self._serve(message)

    def set_time(self, when: int) -> None:
        """time_travel_set_time (K:50-59): the kernel's clock never goes back, and a RUN
        at S64_MAX or later means it was going to sleep forever."""
        if when < self.time:
            raise KernelPanic(f"time-travel: time goes backwards {self.time} -> {when}")
        if when >= S64_MAX:
            raise KernelPanic("The system was going to sleep forever, aborting")
        self.time = when

    def propagate(self) -> None:
        """Publish the clock, as a virtio kick does (K:296-313): into current_time with
        shared memory (only while running), else with an UPDATE message."""
        if self.shm is not None:
            if self.shm.running_id != self.id:
                raise KernelPanic("time-travel: setting time while not running")
            self.shm.current_time = self.time + self.offset
            return
        self.update(self.time)

    def read_clock(self) -> int:
        """time_travel_ext_get_time (K:364-370): what an interrupt reads the time from."""
        if self.shm is not None:
            self.set_time(self.shm.current_time - self.offset)
        else:
            self.set_time(self.get())
        return self.time

    def interrupt(self) -> None:
        """A device interrupt while waiting (K:581-592): read the clock, request now."""
        self.request(self.read_clock())

    def horizon(self) -> int | None:
        if self.shm is not None:
            return self.shm.free_until - self.offset
        return self.free_until

    def sleep(self, delta: int) -> None:
        """Move to ``time + delta``: free-run below the horizon, else request and wait."""
        target = self.time + delta
        horizon = self.horizon()
        if horizon is not None and target < horizon:
            self.time = target
            return
        self.request(target)
        while self.wait() < target:
            self.request(target)

    def run_sleeps(self, start_id: int, sleeps: list[int]) -> list[int]:
        """Boot like a kernel, sleep each interval, then leave; the times it woke at."""
        self.start(start_id)
        woke = []
        for delta in sleeps:
            self.sleep(delta)
            woke.append(self.time)
        self.request(S64_MAX)
        self.close()
        return woke

    def get(self) -> int:
        return self.expect_ack(self.send(Op.GET)).time

    def get_tod(self) -> int:
        return self.expect_ack(self.send(Op.GET_TOD)).time

    def update(self, when: int) -> None:
        self.expect_ack(self.send(Op.UPDATE, when))

    def broadcast(self, value: int) -> None:
        self.expect_ack(self.send(Op.BROADCAST, value))

    def close(self) -> None:
        if self._map is not None:
            self.shm = None
            self._map.close()
            self._map = None
        self.sock.close()
