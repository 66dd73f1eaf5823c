"""``umtt-trace``: read the protocol traces pytest-umtt writes (JSON lines).

- ``umtt-trace show TRACE`` prints a readable timeline;
- ``umtt-trace diff A B`` prints the first divergence: its virtual time, machine, kind and
  both values, with the console lines around it (exit 1 if any); A and B are trace files
  or tests' artifacts directories (then console lines and command results count too);
- ``umtt-trace perfetto TRACE -o OUT.json`` exports Chrome/Perfetto trace JSON: a track
  per machine, a slice for each stretch it ran, an instant for each doorbell.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .divergence import FINGERPRINT_FILE, first_divergence
from .errors import format_ns


def load(path: Path) -> list[dict[str, Any]]:
    """The events of a trace file; a bad line is an error naming the file and line."""
    events = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"umtt-trace: {path}:{number}: not a trace line ({exc.msg})") \
                from None
    return events


def run_items(path: Path) -> list[str]:
    """What ``diff`` compares: a test's artifacts directory gives its whole run (its
    ``fingerprint.txt``: protocol, devices, console lines and command results, each with
    its virtual time), a trace file its protocol and device events."""
    if path.is_dir():
        whole = path / FINGERPRINT_FILE
        if whole.is_file():
            return whole.read_text().split("\n")
        path = path / "trace.jsonl"
    return [json.dumps(event, sort_keys=True) for event in load(path)]


def describe(event: dict[str, Any]) -> str:
    """One event as a timeline line."""
    text = f"{format_ns(event['now']):>22}  {event['client']:<14} {event['kind']:<11}"
    if event.get("op"):
        text += f" {event['op']}(seq={event['seq']}, time={event['time']})"
    if event.get("detail"):
        text += f" {event['detail']}"
    return text.rstrip()


def to_perfetto(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Chrome trace-event JSON (loads in ui.perfetto.dev and chrome://tracing)."""
    tracks: dict[str, int] = {}
    out: list[dict[str, Any]] = []
    running: dict[str, int] = {}

    def track(name: str) -> int:
        if name not in tracks:
            tracks[name] = len(tracks) + 1
            out.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tracks[name],
                        "args": {"name": name}})
        return tracks[name]

    for event in events:
        name, now = event["client"], event["now"]
        if event["kind"] == "run":
            running[name] = now
        elif (event["kind"] == "rx" and event.get("op") == "WAIT") or event["kind"] == "drop":
            if name in running:
                start = running.pop(name)
                out.append({"ph": "X", "name": "run", "pid": 1, "tid": track(name),
                            "ts": start / 1000, "dur": max(now - start, 0) / 1000})
        elif event["kind"] == "rx" and event.get("op") == "BROADCAST":
            out.append({"ph": "i", "s": "t", "name": f"doorbell {event['time']:#x}",
                        "pid": 1, "tid": track(name), "ts": now / 1000})
    return {"traceEvents": out, "displayTimeUnit": "ns"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``umtt-trace``."""
    parser = argparse.ArgumentParser(prog="umtt-trace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print a readable timeline")
    show.add_argument("trace", type=Path)
    diff = commands.add_parser("diff", help="first divergence of two traces")
    diff.add_argument("first", type=Path)
    diff.add_argument("second", type=Path)
    perfetto = commands.add_parser("perfetto", help="export Chrome/Perfetto trace JSON")
    perfetto.add_argument("trace", type=Path)
    perfetto.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "show":
        for event in load(args.trace):
            print(describe(event))
        return 0
    if args.command == "diff":
        first, second = run_items(args.first), run_items(args.second)
        divergence = first_divergence(first, second, labels=(str(args.first),
                                                              str(args.second)))
        print(divergence or f"identical: {len(first)} events")
        return 0 if divergence is None else 1
    args.output.write_text(json.dumps(to_perfetto(load(args.trace))))
    print(f"wrote {args.output} (open it in https://ui.perfetto.dev)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
