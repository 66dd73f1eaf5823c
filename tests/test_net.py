"""Machines on a simulated Ethernet switch, with their real virtio-net drivers: exact
latency, bandwidth a TCP transfer follows, partitions, captures, same seed same bytes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from pytest_umtt import Machine, Simulation, seconds_to_ns
from pytest_umtt.devices import Network
from pytest_umtt.devices.pcapng import PcapngWriter, read_pcapng
from pytest_umtt.rootfs import Rootfs

ETHERTYPE_IPV4 = b"\x08\x00"
SERVER = ("import socket\n"
          "s = socket.socket(); s.bind(('10.0.0.2', 5000)); s.listen(1)\n"
          "c, _ = s.accept(); n = 0\n"
          "while (d := c.recv(65536)):\n"
          "    n += len(d)\n"
          "print(n)\n")
CLIENT = ("import socket\n"
          "s = socket.create_connection(('10.0.0.2', 5000)); s.sendall(bytes(1 << 20))\n"
          "s.close()\n")


def two_machines(sim: Simulation, net: Network) -> tuple[Machine, Machine]:
    a = sim.machine("a", devices=[net.port("a")], boot=False)
    b = sim.machine("b", devices=[net.port("b")], boot=False)
    sim.boot(a, b)
    for machine, address in ((a, "10.0.0.1"), (b, "10.0.0.2")):
        machine.run(f"ip addr add {address}/24 dev eth0 && ip link set eth0 up", check=True)
    return a, b


def test_pcapng_round_trip(tmp_path: Path) -> None:
    writer = PcapngWriter(tmp_path / "p.pcapng", "a")
    writer.write(5, b"\x01" * 60)
    writer.write(2**40 + 7, b"\x02" * 61)
    writer.close()
    assert read_pcapng(tmp_path / "p.pcapng") == [(5, b"\x01" * 60), (2**40 + 7, b"\x02" * 61)]


@pytest.mark.kernel
def test_ping_takes_exactly_twice_the_latency(uml_kernel: Path, rootfs: Rootfs,
                                              tmp_path: Path) -> None:
    net = Network(latency=0.005, capture=tmp_path)
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        a, _ = two_machines(sim, net)
        a.run("ping -c 1 10.0.0.2", check=True)  # ARP first
        ping = a.run("ping -c 1 10.0.0.2", check=True)
    net.close()
    assert "time=10.0 ms" in ping.output
    ip = [(t, frame) for t, frame in read_pcapng(tmp_path / "a.pcapng")
          if frame[12:14] == ETHERTYPE_IPV4]
    (request, _), (reply, _) = ip[-2:]
    assert reply - request == seconds_to_ns(0.010)


@pytest.mark.kernel
def test_a_tcp_transfer_takes_what_bandwidth_and_delay_say(uml_kernel: Path,
                                                           rootfs: Rootfs) -> None:
    net = Network()
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        a, b = two_machines(sim, net)
        net.link("a", "b", latency=0.002, bandwidth_bps=10_000_000)
        a.run("ping -c 1 10.0.0.2", check=True)
        server = b.start(f'python3 -c "{SERVER}"')
        a.run("sleep 0.1")
        sent = a.run(f'python3 -c "{CLIENT}"', check=True)
        received = server.wait()
    assert received.output == f"{1 << 20}\n"
    # 1 MiB in 1448-byte segments, 1514 bytes on the wire each, at 10 Mbit/s: 0.877 s;
    # the handshake and the last segment's flight add a few ms.
    wire = -(-(1 << 20) // 1448) * 1514 * 8 / 10_000_000
    took = received.ended - sent.started
    assert wire < took < wire * 1.02, took


@pytest.mark.kernel
def test_a_partition_the_test_heals_delays_tcp_until_then(uml_kernel: Path,
                                                          rootfs: Rootfs) -> None:
    net = Network(latency=0.001)
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        a, b = two_machines(sim, net)
        a.run("ping -c 1 10.0.0.2", check=True)
        server = b.start(f'python3 -c "{SERVER}"')
        a.run("sleep 0.1")
        net.cut("a", "b")
        healed = sim.now_ns + seconds_to_ns(3)
        net.heal("a", "b", at_ns=healed)
        sent = a.run(f'python3 -c "{CLIENT}"', check=True)
        received = server.wait()
    assert received.output == f"{1 << 20}\n"
    assert net.lost > 0
    assert sent.ended_ns > healed and received.ended_ns > healed


def captured_ping(kernel: Path, rootfs: Rootfs, directory: Path, seed: int) -> bytes:
    net = Network(seed, latency=0.003, capture=directory)
    with Simulation(kernel=kernel, rootfs=rootfs, seed=seed) as sim:
        a, _ = two_machines(sim, net)
        net.link("a", "b", loss=0.3)
        a.run("ping -c 5 -W 1 10.0.0.2")
    net.close()
    return (directory / "a.pcapng").read_bytes()


@pytest.mark.kernel
def test_one_seed_gives_the_same_frames_at_the_same_instants(uml_kernel: Path,
                                                             rootfs: Rootfs,
                                                             tmp_path: Path) -> None:
    first = captured_ping(uml_kernel, rootfs, tmp_path / "1", seed=3)
    again = captured_ping(uml_kernel, rootfs, tmp_path / "2", seed=3)
    assert first == again


def tcp_data_sequence(frames: list[tuple[int, bytes]], source: bytes) -> list[int]:
    """Sequence numbers of the TCP segments with data that ``source`` (a MAC) sent."""
    numbers = []
    for _, frame in frames:
        if frame[6:12] != source or frame[12:14] != ETHERTYPE_IPV4 or frame[23] != 6:
            continue
        ip_length = (frame[14] & 0x0F) * 4
        tcp = frame[14 + ip_length:]
        total = int.from_bytes(frame[16:18], "big")
        if total - ip_length - (tcp[12] >> 4) * 4 > 0:
            numbers.append(int.from_bytes(tcp[4:8], "big"))
    return numbers


@pytest.mark.kernel
def test_reordered_frames_arrive_out_of_order_and_tcp_still_delivers(
        uml_kernel: Path, rootfs: Rootfs, tmp_path: Path) -> None:
    net = Network(5, latency=0.001, capture=tmp_path)
    with Simulation(kernel=uml_kernel, rootfs=rootfs, seed=5) as sim:
        a, b = two_machines(sim, net)
        net.link("a", "b", bandwidth_bps=50_000_000, reorder=0.2, reorder_delay=0.002)
        a.run("ping -c 1 10.0.0.2", check=True)
        server = b.start(f'python3 -c "{SERVER}"')
        a.run("sleep 0.1")
        a.run(f'python3 -c "{CLIENT}"', check=True)
        received = server.wait()
    net.close()
    assert received.output == f"{1 << 20}\n"
    arrived = tcp_data_sequence(read_pcapng(tmp_path / "b.pcapng"), net.ports["a"].mac)
    assert any(later < earlier for earlier, later in itertools.pairwise(arrived))
