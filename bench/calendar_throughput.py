"""Messages per second through the calendar, driven by reference clients in processes.

Every sleep is a full round trip (the free run is capped at 1 ns), so this measures the
calendar's own cost per message. Run: python bench/calendar_throughput.py
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_umtt.controller import Calendar
from tests.refclient import RefClient


def client(path: str, client_id: int, wakeups: int) -> None:
    RefClient.connect(path).run_sleeps(client_id, [1000 + client_id] * wakeups)


def measure(clients: int, shm: bool, wakeups: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp, \
            Calendar(shm=shm, expected_clients=clients, pause_on_broadcast=False,
                     max_free_run=1) as calendar:
        path = str(calendar.listen(Path(tmp) / "time.sock"))
        context = multiprocessing.get_context("fork")
        procs = [context.Process(target=client, args=(path, n + 1, wakeups))
                 for n in range(clients)]
        for proc in procs:
            proc.start()
        calendar.serve_until(lambda: calendar.starts_seen == clients, wall_timeout=30)
        started = time.perf_counter()
        while calendar.live_clients():
            calendar.run_until(stall_timeout=30)
            calendar.serve_until(lambda: not calendar.live_clients(), wall_timeout=0.01)
        wall = time.perf_counter() - started
        for proc in procs:
            proc.join()
        return calendar.messages_received + calendar.messages_sent, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wakeups", type=int, default=5000, help="per client")
    args = parser.parse_args()
    print(f"{'clients':>7} {'mode':>8} {'wake-ups':>9} {'messages':>9} {'wall s':>7} "
          f"{'msgs/s':>9} {'wakes/s':>8}")
    for clients in (1, 4):
        for shm in (True, False):
            messages, wall = measure(clients, shm, args.wakeups)
            wakes = clients * args.wakeups
            print(f"{clients:>7} {'shm' if shm else 'messages':>8} {wakes:>9} {messages:>9} "
                  f"{wall:>7.2f} {messages / wall:>9.0f} {wakes / wall:>8.0f}")


if __name__ == "__main__":
    main()
