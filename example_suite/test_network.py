"""Two machines on a simulated switch: a ping's round trip is exactly twice the link's
latency, and a link the test cuts and heals holds a TCP transfer until it heals."""

import pytest

from pytest_umtt import Machine, MachineFactory, Simulation
from pytest_umtt.devices import Network

SERVER = ("import socket\n"
          "s = socket.socket(); s.bind(('10.0.0.2', 5000)); s.listen(1)\n"
          "c, _ = s.accept(); n = 0\n"
          "while (d := c.recv(65536)):\n"
          "    n += len(d)\n"
          "print(n)\n")
CLIENT = ("import socket\n"
          "s = socket.create_connection(('10.0.0.2', 5000)); s.sendall(bytes(100_000))\n"
          "s.close()\n")


@pytest.fixture
def pair(umtt_machine_factory: MachineFactory, umtt_sim: Simulation,
         umtt_network: Network) -> tuple[Network, Machine, Machine]:
    net = umtt_network  # seeded by the test's seed; --umtt-artifacts keeps its captures
    net.link("a", "b", latency=0.005)
    a = umtt_machine_factory("a", devices=[net.port("a")], boot=False)
    b = umtt_machine_factory("b", devices=[net.port("b")], boot=False)
    umtt_sim.boot(a, b)
    for machine, address in ((a, "10.0.0.1"), (b, "10.0.0.2")):
        machine.run(f"ip addr add {address}/24 dev eth0 && ip link set eth0 up", check=True)
    return net, a, b


def test_ping_round_trip_is_twice_the_latency(pair: tuple[Network, Machine, Machine]) -> None:
    _, a, _ = pair
    first = a.run("ping -c 1 10.0.0.2", check=True)
    assert "time=20.0 ms" in first.output  # ARP's round trip, then the echo's
    assert "time=10.0 ms" in a.run("ping -c 1 10.0.0.2", check=True).output


def test_tcp_waits_for_a_healed_partition(pair: tuple[Network, Machine, Machine],
                                          umtt_sim: Simulation) -> None:
    net, a, b = pair
    server = b.start(f'python3 -c "{SERVER}"')
    a.run("sleep 0.1")
    net.cut("a", "b")
    heal = umtt_sim.now + 2.0
    net.heal("a", "b", at=heal)
    a.run(f'python3 -c "{CLIENT}"', check=True)
    received = server.wait()
    assert received.output == "100000\n"
    assert received.ended > heal
