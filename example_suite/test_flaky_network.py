"""A protocol with a timing assumption, over a network that breaks it now and then.

The client sends numbered updates over UDP, back to back; the server applies them in
the order they arrive, assuming that is the order they were sent. The link (1 ms,
100 Mbit/s) reorders: each frame is held 3 ms longer with probability 0.1, drawn from
the test's seed, so a frame sent after a held one overtakes it; and it loses 3% of
frames (the server gives up after a second). With the default seed no update is
overtaken and the test passes; for some seeds one is, and the test fails, each time
the same way. The README's *Triage* section walks through it: how often it fails
(``--umtt-explore``), why (the failure's signature), the one network decision the
failure needs (``--umtt-shrink``), and a replay of just that (``--umtt-schedule``).
"""

from pytest_umtt import MachineFactory, Simulation
from pytest_umtt.devices import Network

UPDATES = 4
SERVER = ("import socket\n"
          "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
          "s.bind(('10.0.0.2', 5000)); s.settimeout(1); got = []\n"
          "try:\n"
          f"    while len(got) < {UPDATES}: got.append(s.recv(64).decode())\n"
          "except TimeoutError: pass\n"
          "print(*got)\n")
CLIENT = ("import socket\n"
          "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
          f"for n in range({UPDATES}):\n"
          "    s.sendto(str(n).encode(), ('10.0.0.2', 5000))\n")


def test_updates_are_applied_in_the_order_sent(umtt_machine_factory: MachineFactory,
                                               umtt_sim: Simulation,
                                               umtt_network: Network) -> None:
    umtt_network.link("client", "server", latency=0.001, bandwidth_bps=100_000_000,
                      reorder=0.1, reorder_delay=0.003, loss=0.03)
    client = umtt_machine_factory("client", devices=[umtt_network.port("client")], boot=False)
    server = umtt_machine_factory("server", devices=[umtt_network.port("server")], boot=False)
    umtt_sim.boot(client, server)
    client.run("ip addr add 10.0.0.1/24 dev eth0 && ip link set eth0 up", check=True)
    server.run("ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up", check=True)
    applied = server.start(f'python3 -c "{SERVER}"')
    client.run("ping -c 1 -W 1 10.0.0.2")  # the server is up, and ARP is done
    client.run(f'python3 -c "{CLIENT}"', check=True)
    order = applied.wait().output.split()
    assert len(order) == UPDATES, f"{UPDATES - len(order)} of {UPDATES} updates lost: {order}"
    assert order == sorted(order), f"updates applied out of order: {order}"
