"""Devices against a hostile frontend (tests/hostile_frontend.py): every malformed,
oversized or out-of-bounds input a kernel's side could send is a clear DeviceError
naming the device and the request, or is dropped and counted where the device may
drop it; the connection is closed; pytest's process keeps its descriptors and memory.
Then the same through a machine (the fake guest), and a real kernel's machine."""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings

from pytest_umtt import DeviceError, MachineCrashed, Simulation
from pytest_umtt import simulation as simulation_module
from pytest_umtt.devices import Network, VirtioDevice, VirtioGpio, VirtioNet, VirtioRng
from pytest_umtt.devices.console import VirtioConsole
from pytest_umtt.devices.net import MAX_WAITING
from pytest_umtt.devices.vhost_user import (
    CONFIG_HEADER,
    FLAG_NEED_REPLY,
    HEADER,
    PAYLOAD_SIZES,
    VERSION,
    Request,
)
from pytest_umtt.devices.virtqueue import DESC_F_NEXT, DESC_F_WRITE, VirtQueue
from pytest_umtt.kernel import KernelCheck
from pytest_umtt.rootfs import Rootfs
from tests.device_fuzzing import Action, inputs, play
from tests.hostile_frontend import GuestRam, HostileFrontend, Ring, Served

MiB = 1 << 20
RSS_SLACK = 64 * MiB
"""What a test may leave pytest's memory grown by: far below what any of these inputs
asked for before (gigabytes), far above what a few allocator arenas keep."""
REPO = Path(__file__).resolve().parent.parent

Serve = Callable[..., Served]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def process_fine() -> Iterator[None]:
    """After the test and its teardown, pytest has its descriptors back and has not
    grown by what a guest asked for."""
    fds, rss = open_fds(), psutil.Process().memory_info().rss
    yield
    assert open_fds() == fds
    assert psutil.Process().memory_info().rss - rss < RSS_SLACK


@pytest.fixture
def serve(process_fine: None, tmp_path: Path) -> Iterator[Serve]:
    made: list[Served] = []

    def make(device: VirtioDevice, ram_size: int = MiB, handshake: bool = True) -> Served:
        served = Served(device, tmp_path, ram_size)
        made.append(served)
        if handshake:
            assert served.frontend is not None
            served.frontend.handshake(served.ram)
        return served

    yield make
    for served in made:
        served.close()


def failure(served: Served) -> DeviceError:
    """The device's failure; the connection must be closed."""
    assert served.frontend is not None
    assert served.frontend.is_closed()
    error = served.device.failure
    assert isinstance(error, DeviceError), served.device.backend and served.device.backend.errors
    assert error.device == f"hostile/{served.device.name}"
    return error


def frontend(served: Served) -> HostileFrontend:
    assert served.frontend is not None
    return served.frontend


# --- messages ---------------------------------------------------------------------------


def test_a_kernel_that_never_reads_its_replies_fails_its_device_and_blocks_nothing(
        serve: Serve) -> None:
    served = serve(VirtioConsole(), handshake=False)
    peer = frontend(served)
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    flood = HEADER.pack(Request.GET_FEATURES, FLAG_NEED_REPLY | VERSION, 0) * 20_000
    peer.raw(flood)
    error = failure(served)
    assert error.request == "a reply"
    assert "does not read its replies" in error.detail


def test_replies_a_kernel_reads_late_all_arrive_in_order(serve: Serve) -> None:
    served = serve(VirtioConsole(), handshake=False)
    peer = frontend(served)
    count = 2000  # more than the socket holds, less than the 64 KiB that may wait
    peer.raw(HEADER.pack(Request.GET_FEATURES, FLAG_NEED_REPLY | VERSION, 0) * count)
    backend = served.device.backend
    assert backend is not None and backend._replies is not None
    assert backend._replies.waiting, "the socket took everything: nothing was tested"
    for _ in range(100):
        peer.drain()
        served.pump()
        if len(peer.replies) == count:
            break
    assert len(peer.replies) == count
    assert {request for request, _flags, _payload in peer.replies} == {Request.GET_FEATURES}
    assert served.device.failure is None


@pytest.mark.parametrize("request_code", sorted(PAYLOAD_SIZES))
def test_a_message_without_its_payload_is_an_error_naming_the_request(
        serve: Serve, request_code: int) -> None:
    served = serve(VirtioRng())
    frontend(served).send(request_code, b"\1\2\3")
    error = failure(served)
    assert error.request == Request(request_code).name
    assert f"a payload of 3 bytes, the request needs {PAYLOAD_SIZES[request_code]}" \
        in error.detail
    assert "virtual time" in str(error) and "hostile/rng" in str(error)


def test_a_header_announcing_4_gib_is_refused_before_anything_is_buffered(
        serve: Serve) -> None:
    served = serve(VirtioRng())
    frontend(served).send(Request.SET_FEATURES, bytes(4000), size=0xFFFFFFFF)
    error = failure(served)
    assert "announces a payload of 4294967295 bytes" in error.detail


@pytest.mark.parametrize("code", [0, 7, 99, 0xFFFFFFFF, Request.SET_VRING_KICK])
def test_an_unknown_request_is_an_error(serve: Serve, code: int) -> None:
    served = serve(VirtioRng())
    frontend(served).send(code, bytes(8), flags=FLAG_NEED_REPLY)
    error = failure(served)
    assert "a request this device does not know" in error.detail
    assert str(code) in error.request or error.request == Request(code).name


def test_descriptors_sent_with_messages_that_take_none_are_closed(serve: Serve) -> None:
    served = serve(VirtioRng(), handshake=False)
    peer = frontend(served)
    spare = os.memfd_create("spare", os.MFD_CLOEXEC)
    for _ in range(300):  # 900 descriptors: EMFILE long before the end, were they kept
        peer.send(Request.GET_FEATURES, fds=[spare, spare, spare])
    os.close(spare)
    peer.drain()
    assert served.device.failure is None and not peer.closed


def test_a_descriptor_goes_with_its_own_message(serve: Serve) -> None:
    served = serve(VirtioRng(), handshake=False)
    peer = frontend(served)
    stray = os.memfd_create("stray", os.MFD_CLOEXEC)
    served.ram.write(served.ram.base, b"mine")
    # Both in one write would be one message's: two sends, as a frontend sends two.
    peer.send(Request.SET_FEATURES, struct.pack("<Q", 1 << 32), fds=[stray])
    peer.mem_table([served.ram.region()], [served.ram.fd])
    os.close(stray)
    assert served.device.failure is None
    assert served.device.backend is not None
    assert served.device.backend.memory.read(served.ram.base, 4) == b"mine"


def not_a_socket() -> list[int]:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return [read_end]


def datagram_socket() -> list[int]:
    one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    two.close()
    return [one.detach()]


def two_sockets() -> list[int]:
    pairs = [socket.socketpair() for _ in range(2)]
    for _ours, theirs in pairs:
        theirs.close()
    return [ours.detach() for ours, _theirs in pairs]


@pytest.mark.parametrize("make,expected", [
    (list, "takes one descriptor, came with 0"),
    (two_sockets, "takes one descriptor, came with 2"),
    (not_a_socket, "its descriptor is not a socket"),
    (datagram_socket, "its descriptor is not a Unix stream socket"),
])
def test_a_bad_backend_request_channel_is_an_error(serve: Serve, make: Callable[[], list[int]],
                                                   expected: str) -> None:
    served = serve(VirtioRng(), handshake=False)
    fds = make()
    frontend(served).send(Request.SET_SLAVE_REQ_FD, fds=fds)
    for fd in fds:
        os.close(fd)
    error = failure(served)
    assert (error.request, error.detail) == ("SET_SLAVE_REQ_FD", expected)


@pytest.mark.parametrize("header,expected", [
    (CONFIG_HEADER.pack(0, 7, 0) + bytes(7), "config bytes 0..7 asked for"),
    (CONFIG_HEADER.pack(2, 4, 0) + bytes(2), "writes 4 config bytes and carries 2"),
])
def test_set_config_is_bounded_by_the_config_space(serve: Serve, header: bytes,
                                                   expected: str) -> None:
    served = serve(Network().port("a"))
    frontend(served).send(Request.SET_CONFIG, header)
    assert expected in failure(served).detail


# --- the memory table -------------------------------------------------------------------


def pipe_end(_ram: GuestRam) -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def read_only_copy(ram: GuestRam) -> int:
    return os.open(f"/proc/self/fd/{ram.fd}", os.O_RDONLY | os.O_CLOEXEC)


BAD_TABLES: dict[str, tuple[Callable[[GuestRam], tuple[list[tuple[int, int, int, int]],
                                                         list[int], int | None]], str]] = {
    "count above descriptors": (lambda ram: ([ram.region()], [os.dup(ram.fd)], 2),
                                "names 2 regions but passed 1 descriptors"),
    "descriptors above count": (lambda ram: ([ram.region()], [os.dup(ram.fd)] * 1 +
                                             [os.dup(ram.fd)], 1),
                                "names 1 regions but passed 2 descriptors"),
    "nine regions": (lambda ram: ([ram.region()] * 9, [os.dup(ram.fd) for _ in range(8)], 9),
                     "names 9 regions, at most 8"),
    "unaligned offset": (lambda ram: ([(ram.base, 4096, ram.base, 100)], [os.dup(ram.fd)],
                                      None), "a non-zero multiple of the page size"),
    "empty region": (lambda ram: ([(ram.base, 0, ram.base, 0)], [os.dup(ram.fd)], None),
                     "a non-zero multiple of the page size"),
    "2**63 bytes": (lambda ram: ([(ram.base, 1 << 63, ram.base, 4096)], [os.dup(ram.fd)],
                                 None), "overflows"),
    "wraps the address space": (lambda ram: ([(2**64 - 4096, 8192, 0, 0)], [os.dup(ram.fd)],
                                             None), "overflows"),
    "beyond the file": (lambda ram: ([(ram.base, 64 * MiB, ram.base, 0)], [os.dup(ram.fd)],
                                     None), "the region ends at"),
    "read-only": (lambda ram: ([ram.region()], [read_only_copy(ram)], None),
                  "not open for reading and writing"),
    "a pipe": (lambda ram: ([ram.region()], [pipe_end(ram)], None), "not a memory file"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_a_bad_memory_table_is_an_error_naming_the_device(serve: Serve, case: str) -> None:
    served = serve(VirtioRng(), handshake=False)
    make, expected = BAD_TABLES[case]
    regions, fds, count = make(served.ram)
    frontend(served).mem_table(regions, fds, count)
    leftover = [fd for fd in fds if fd != served.ram.fd]
    for fd in leftover:
        os.close(fd)  # ours: the backend closed the copies it was sent
    error = failure(served)
    assert error.request == "SET_MEM_TABLE"
    assert expected in error.detail


def test_a_table_shorter_than_its_count_is_an_error(serve: Serve) -> None:
    served = serve(VirtioRng(), handshake=False)
    frontend(served).send(Request.SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(32),
                          fds=[served.ram.fd, served.ram.fd])
    assert "names 2 regions in a payload of 40 bytes" in failure(served).detail


def test_memory_shrunk_after_the_table_is_an_error_not_a_sigbus(serve: Serve) -> None:
    served = serve(VirtioConsole())
    ring = served.ring(1)
    ring.descriptor(0, ring.buffers, 64)
    ring.offer(0)
    served.ram.shrink(4096)
    frontend(served).kick(1)
    error = failure(served)
    assert error.request == "VRING_KICK"
    assert "shrunk after SET_MEM_TABLE" in error.detail


# --- rings ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 100, 32769, 65536, 0xFFFFFFFF])
def test_a_queue_size_must_be_a_power_of_two_up_to_32768(serve: Serve, size: int) -> None:
    served = serve(VirtioGpio())
    frontend(served).state(Request.SET_VRING_NUM, 1, size)
    error = failure(served)
    assert error.request == "SET_VRING_NUM"
    assert f"size {size} is not a power of two from 1 to 32768" in error.detail
    assert isinstance(served.device, VirtioGpio)
    served.device.drive(0, 1)  # an event ring that never was: nothing to report into


@pytest.mark.parametrize("size", [4, 32768])
def test_a_descriptor_loop_ends_at_the_tables_size(serve: Serve, size: int) -> None:
    served = serve(VirtioConsole(), ram_size=2 * MiB)
    ring = served.ring(1, size)
    ring.descriptor(0, ring.buffers, 16, DESC_F_NEXT, 1)
    ring.descriptor(1, ring.buffers, 16, DESC_F_NEXT, 0)
    ring.offer(0)
    frontend(served).kick(1)
    assert "loops" in failure(served).detail


@pytest.mark.parametrize("device", [VirtioConsole, VirtioRng, VirtioGpio,
                                    lambda: Network().port("a")])
def test_an_available_index_jumping_past_the_ring_is_an_error(
        serve: Serve, device: Callable[[], VirtioDevice]) -> None:
    served = serve(device())
    queue = 1 if served.device.num_queues > 1 else 0
    ring = served.ring(queue)
    ring.set_avail_idx(65535)
    frontend(served).kick(queue)
    assert "the available index moved from 0 to 65535, more than the ring's 8 entries" \
        in failure(served).detail


def test_a_head_outside_the_table_is_an_error(serve: Serve) -> None:
    served = serve(VirtioConsole())
    ring = served.ring(1)
    ring.offer(60000)
    frontend(served).kick(1)
    assert "head 60000 is outside the 8-entry descriptor table" in failure(served).detail


def test_a_descriptor_outside_guest_memory_is_an_error(serve: Serve) -> None:
    served = serve(VirtioConsole())
    ring = served.ring(1)
    ring.descriptor(0, 0xDEAD0000, 64)
    ring.offer(0)
    frontend(served).kick(1)
    assert "guest address 0xdead0000+64 is outside the shared memory" in failure(served).detail


def test_a_chain_of_256_buffers_of_4_mib_is_refused_unread(serve: Serve) -> None:
    served = serve(VirtioConsole(), ram_size=8 * MiB)
    ring = served.ring(1, 256)
    for index in range(256):
        ring.descriptor(index, served.ram.base + 4 * MiB, 4 * MiB,
                        DESC_F_NEXT if index < 255 else 0, index + 1)
    ring.offer(0)
    frontend(served).kick(1)
    assert "holds 1073741824 bytes to read, more than the 1048576" in failure(served).detail


def test_chains_sharing_their_descriptors_are_refused(serve: Serve) -> None:
    served = serve(VirtioConsole(), ram_size=2 * MiB)
    ring = served.ring(1, 256)
    for index in range(255):  # one chain of the whole table, offered 256 times
        ring.descriptor(index, ring.buffers, 1, DESC_F_NEXT, index + 1)
    ring.descriptor(255, ring.buffers, 1)
    for _ in range(256):
        ring.offer(0)
    frontend(served).kick(1)
    assert "use more descriptors than the 256-entry table" in failure(served).detail


def test_an_rng_buffer_beyond_memory_draws_nothing(serve: Serve) -> None:
    served = serve(VirtioRng(), ram_size=4 * MiB)
    ring = served.ring(0)
    ring.descriptor(0, served.ram.base, 256 * MiB, DESC_F_WRITE)
    ring.offer(0)
    frontend(served).kick(0)
    assert "outside the shared memory" in failure(served).detail
    assert isinstance(served.device, VirtioRng) and served.device.bytes_served == 0


def test_an_rng_answer_is_bounded(serve: Serve) -> None:
    served = serve(VirtioRng(), ram_size=4 * MiB)
    ring = served.ring(0, 64)
    for index in range(64):  # 64 requests of 1 MiB each, in the same 1 MiB
        ring.descriptor(index, served.ram.base + 2 * MiB, MiB, DESC_F_WRITE)
        ring.offer(index)
    frontend(served).kick(0)
    rng = served.device
    assert isinstance(rng, VirtioRng) and rng.failure is None
    assert rng.bytes_served == 64 * 64 * 1024  # 64 KiB each, in answers of at most 1 MiB
    assert len(rng.answers) == 4
    assert [length for _, length in ring.take_used()] == [64 * 1024] * 64


def test_a_disabled_ring_is_left_alone(serve: Serve) -> None:
    served = serve(VirtioRng())
    ring = served.ring(0)
    ring.descriptor(0, ring.buffers, 64, DESC_F_WRITE)
    ring.offer(0)
    peer = frontend(served)
    # One write: the kick is answered a latency later, the ring is disabled before that.
    peer.raw(HEADER.pack(Request.VRING_KICK, FLAG_NEED_REPLY | VERSION, 8) + bytes(8) +
             HEADER.pack(Request.SET_VRING_ENABLE, VERSION, 8) + bytes(8))
    assert served.device.failure is None
    assert ring.used_idx() == 0 and served.ram.read(ring.buffers, 64) == bytes(64)
    peer.kick(0)
    assert ring.used_idx() == 0


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize("offset,size", [(0, 0xFFFFFFFF), (0, 200 * MiB), (0, 7), (6, 1),
                                         (0xFFFFFFFF, 1)])
def test_get_config_is_bounded_by_the_config_space(serve: Serve, offset: int,
                                                   size: int) -> None:
    served = serve(Network().port("a"))
    frontend(served).get_config(offset, size)
    error = failure(served)
    assert error.request == "GET_CONFIG"
    assert f"config bytes {offset}..{offset + size} asked for, the config space has 6" \
        in error.detail


def test_get_config_answers_within_the_config_space(serve: Serve) -> None:
    net = Network().port("a")
    served = serve(net)
    peer = frontend(served)
    peer.get_config(0, 6)
    peer.drain()
    request, _flags, payload = peer.replies[-1]
    assert request == Request.GET_CONFIG
    assert payload == CONFIG_HEADER.pack(0, 6, 0) + net.mac


# --- the network ------------------------------------------------------------------------


def transmit(served: Served, ring: Ring, frames: list[bytes], spacing: int = 16384) -> None:
    for index, frame in enumerate(frames):
        at = ring.buffers + index * spacing
        served.ram.write(at, bytes(12) + frame)
        ring.descriptor(index, at, 12 + len(frame))
        ring.offer(index)
    frontend(served).kick(1)


def test_runts_and_giant_frames_are_dropped_and_counted(serve: Serve) -> None:
    network = Network()
    a, b = network.port("a"), network.port("b")
    sender, receiver = serve(a), serve(b)
    transmit(sender, sender.ring(1), [b"", b"\x01" * 13, b"\xff" * 9014])
    receiver.pump()
    assert (a.invalid, a.failure, b.dropped) == (3, None, 0)
    assert b.failure is None


def test_a_frame_for_a_port_without_rings_waits_for_them(serve: Serve) -> None:
    network = Network()
    a, b = network.port("a"), network.port("b")
    sender, receiver = serve(a), serve(b)
    frame = b"\xff" * 6 + a.mac + b"\x08\x00" + bytes(50)
    transmit(sender, sender.ring(1, 512), [frame] * (MAX_WAITING + 3), spacing=128)
    receiver.pump()
    assert (a.failure, b.failure, b.dropped) == (None, None, 3)
    ring = receiver.ring(0, 16)
    for index in range(16):
        ring.descriptor(index, ring.buffers + 2048 * index, 2048, DESC_F_WRITE)
        ring.offer(index)
    frontend(receiver).kick(0)
    assert [length for _, length in ring.take_used()] == [12 + len(frame)] * 16
    assert receiver.ram.read(ring.buffers + 12, len(frame)) == frame


def test_a_frame_for_a_port_without_a_kernel_is_dropped_and_counted(serve: Serve) -> None:
    network = Network()
    a, b = network.port("a"), network.port("b")
    sender = serve(a)
    b.serve(sender.calendar, str(Path(sender.path).with_name("b.sock")), seed=0)
    transmit(sender, sender.ring(1), [b"\xff" * 6 + a.mac + bytes(50)])
    sender.pump()
    assert (a.failure, b.dropped) == (None, 1)
    b.close()


# --- through a machine ------------------------------------------------------------------


@pytest.fixture
def fake_sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulation]:
    kernel = tmp_path / "linux"
    kernel.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      f"from tests.fakeguest import main\nsys.exit(main(sys.argv[1:]))\n")
    kernel.chmod(0o755)
    monkeypatch.setattr(simulation_module, "check_kernel",
                        lambda path: KernelCheck(path, (), ()))
    with Simulation(kernel=kernel, directory=tmp_path / "sim", wall_timeout=5,
                    deterministic=False) as simulation:
        yield simulation


def test_a_device_failing_on_guest_input_crashes_its_machine_with_the_cause(
        fake_sim: Simulation) -> None:
    machine = fake_sim.machine("fake", devices=[VirtioRng()])
    def pump() -> None:
        fake_sim.calendar.step(0)

    peer = HostileFrontend(fake_sim.bind_path("fake-rng.sock"), pump)
    peer.state(Request.SET_VRING_NUM, 0, 3)
    with pytest.raises(MachineCrashed) as first:
        machine.run("echo hi")
    assert "device fake/rng failed on SET_VRING_NUM: queue 0: size 3 is not a power of two" \
        in str(first.value)
    assert "busy loop" not in str(first.value)
    with pytest.raises(MachineCrashed) as later:
        machine.run("echo again")
    assert later.value.what == first.value.what
    assert peer.is_closed()
    peer.close()


# --- a real kernel ----------------------------------------------------------------------


class ShortConfigNet(VirtioNet):
    """A network device whose config space is shorter than the MAC its driver reads
    (byte by byte: the third read is the first past it)."""

    def config(self) -> bytes:
        return self.mac[:2]


@pytest.mark.kernel
def test_a_device_failing_under_a_real_kernel_crashes_its_machine_at_once(
        uml_kernel: Path, rootfs: Rootfs) -> None:
    network = Network()
    device = ShortConfigNet(network, "a")
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        with pytest.raises(MachineCrashed) as crash:
            sim.machine("m", devices=[device])
        assert "device m/net-a failed on GET_CONFIG: config bytes 0..3 asked for, the " \
               "config space has 2" in str(crash.value)
        assert device.failure is not None and device.failure.request == "GET_CONFIG"


# --- fuzzing ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=inputs)
def test_no_hostile_input_escapes_a_device(case: tuple[str, list[Action]]) -> None:
    """Random hostile inputs (tests/device_fuzzing.py; bench/fuzz_devices.py runs them
    for minutes): nothing escapes the device, every descriptor comes back."""
    device, steps = case
    play(device, steps)


class BreakableRng(VirtioRng):
    """An rng model with a bug a test can switch on: its kick handler raises."""

    broken = False

    def on_kick(self, queue: VirtQueue) -> None:
        if self.broken:
            raise RuntimeError("the model's own bug")
        super().on_kick(queue)


@pytest.mark.kernel
def test_a_model_that_raises_on_a_kick_crashes_its_machine_not_the_calendar(
        uml_kernel: Path, rootfs: Rootfs) -> None:
    rng = BreakableRng()
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", devices=[rng])
        other = sim.machine("other")
        rng.broken = True
        with pytest.raises(MachineCrashed) as crash:
            machine.run("head -c 64 /dev/hwrng > /dev/null")
        assert "device m/rng failed on VRING_KICK: RuntimeError: the model's own bug" \
            in str(crash.value)
        with pytest.raises(MachineCrashed):
            machine.run("true")
        assert other.run("echo fine").output == "fine\n"
