"""Signatures of kernel reports: what kind of report, and where in the kernel.

A signature is the report's kind and the first frames of its call trace, with everything
that changes from run to run left out: offsets and addresses, the compiler's suffixes
(``.isra.0``, ``.constprop.0``, ``.cold``: a function name in C has no dot), frames the
walker was unsure of (``?``: stale return addresses UML's stack walk finds on the stack,
arch/um/kernel/stacktrace.c) and the reporting machinery's own frames at the top
(``dump_stack_lvl``, ``__warn``, ``kasan_report``...). Two reports of one bug have one
signature across seeds, runs and rebuilds of the same source, so failures group by it:
a splat, a crash (:func:`signature` over the console from the crash on), a flaky test.

Works on lines of text only: no pytest, no machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SIGNATURE_FRAMES = 5
"""Frames a signature keeps: enough to tell callers apart, few enough to survive
refactoring further up the stack."""

PRINTK_PREFIX = re.compile(r"^(?:\[\s*\d+\.\d+\]\s?)?(?:\[\s*[TC]\d+\]\s?)?")
"""printk's own prefixes, when the kernel adds them: the time (CONFIG_PRINTK_TIME) and
the caller (CONFIG_PRINTK_CALLER)."""

FRAME = re.compile(
    r"(?:\s*\[<[0-9a-fA-F]+>\]\s*|\s+)"   # UML's " [<6005a8b2>] ", or indentation
    r"(?P<unsure>\?\s+)?"
    r"(?P<function>[A-Za-z_][A-Za-z0-9_.$]*)\+0x[0-9a-fA-F]+/0x[0-9a-fA-F]+"
    r"(?:\s+\[(?P<module>[A-Za-z0-9_-]+)\])?")
"""One frame as the kernel prints it with %pS: ``function+0xOFFSET/0xSIZE [module]``."""

TRACE_MARK = re.compile(r"\s*</?(?:TASK|IRQ|NMI|SOFTIRQ|EOI)>\s*$"
                        r"|\s*\[<[0-9a-fA-F]+>\]\s*(?:\?\s+)?0x[0-9a-fA-F]+\s*$")
"""Lines of a call trace that are no frame of it: x86's context markers, and UML's
addresses that no symbol covers (`` [<6000e589>] 0x6000e589``)."""

REPORTING_FRAMES = re.compile(
    r"(?:dump_stack|dump_stack_lvl|__dump_stack|show_stack|show_regs|show_trace_log_lvl"
    r"|sched_show_task|__switch_to|__schedule|schedule|schedule_timeout|dump_trace|_print_addr|stack_trace_print|stack_trace_save"
    r"|arch_stack_walk|panic|vpanic|__warn|warn_slowpath_fmt|__warn_printk|report_bug|handle_bug"
    r"|__might_resched|__might_sleep|__schedule_bug|check_panic_on_warn"
    r"|refcount_warn_saturate|__refcount_\w+|refcount_(?:inc|dec|add|sub)\w*|ubsan_\w+|__ubsan_handle_\w+|kasan_report\w*"
    r"|__kasan_\w+|kasan_check_range|__asan_\w+|print_report|print_address_description"
    r"|kfence_report_error|kfence_handle_page_fault|__kfence_\w+|kmemleak_alloc\w*"
    r"|create_object|__create_object|lock_acquire|__lock_acquire|lock_release"
    r"|save_stack_trace|save_trace|__mutex_lock\w*|mutex_lock\w*|_raw_(?:spin|read|write)_lock\w*"
    r"|down_(?:read|write)\w*"
    r"|__lock_release|validate_chain|check_prev_add|check_prevs_add|check_noncircular"
    r"|print_circular_bug|check_deadlock|print_deadlock_bug|print_usage_bug|mark_lock"
    r"|mark_lock_irq|valid_state|lockdep_\w+|lock_is_held_type|debug_show_all_locks"
    r"|watchdog_timer_fn|rcu_dump_cpu_stacks|print_cpu_stall|check_cpu_stall"
    r"|rcu_sched_clock_irq|_printk|vprintk\w*)")
"""Frames of the code that prints a report, or of the API that detected the misuse (the
refcount_t helpers; the locking calls whose acquisition lockdep saved, and UML's
save_stack_trace, which lead each entry of a lockdep chain), rather than the code it
reports on: skipped while they lead a trace."""

HEADER_CHARS = 160
"""Characters of a masked first line a signature keeps."""

NUMBER = re.compile(r"\b0x[0-9a-fA-F]+\b|\b[0-9a-fA-F]{8,}\b|\d+")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a call trace: the function (compiler suffixes dropped), its module
    if it is in one, and whether the stack walker was sure of it."""

    function: str
    module: str | None
    reliable: bool

    def __str__(self) -> str:
        return self.function if self.module is None else f"{self.function} [{self.module}]"


def strip_printk_prefix(text: str) -> str:
    """``text`` without the time and caller printk may put before every line."""
    return PRINTK_PREFIX.sub("", text, count=1)


def parse_frame(text: str) -> Frame | None:
    """The frame a console line shows, or None if it shows none."""
    found = FRAME.match(strip_printk_prefix(text))
    if found is None:
        return None
    return Frame(found["function"].split(".", 1)[0], found["module"], not found["unsure"])


def is_trace_line(text: str) -> bool:
    """Whether the line belongs to a call trace: a frame, a context marker, or an
    address without a symbol."""
    return parse_frame(text) is not None or TRACE_MARK.match(strip_printk_prefix(text)) is not None


def first_trace(lines: Iterable[str]) -> list[Frame]:
    """The frames of the first call trace among ``lines``: the first run of frame lines.
    Frames the walker was unsure of are dropped when it was sure of any."""
    frames: list[Frame] = []
    for text in lines:
        frame = parse_frame(text)
        if frame is not None:
            frames.append(frame)
        elif frames and TRACE_MARK.match(strip_printk_prefix(text)) is None:
            break
    reliable = [frame for frame in frames if frame.reliable]
    return reliable or frames


def leading_frames(lines: Iterable[str], depth: int = SIGNATURE_FRAMES) -> list[Frame]:
    """The first ``depth`` frames of the first call trace in ``lines``, after the frames
    of the machinery that reported it (dump_stack, __warn, kasan_report, ...)."""
    frames = first_trace(lines)
    skip = 0
    while skip < len(frames) - 1 and REPORTING_FRAMES.fullmatch(frames[skip].function):
        skip += 1
    return frames[skip:skip + depth]


def mask(text: str) -> str:
    """``text`` with addresses and numbers replaced by ``N``: the words of a report's
    header without what changes between two reports of one bug."""
    return NUMBER.sub("N", strip_printk_prefix(text)).strip()


def signature(kind: str, lines: Iterable[str], depth: int = SIGNATURE_FRAMES) -> str:
    """``KIND: f1:f2:...``: the kind and the first ``depth`` frames of the first call
    trace in ``lines``, after the reporting machinery's frames. A report without a call
    trace is known by its first line, masked (:func:`mask`)."""
    lines = list(lines)
    kept = [str(frame) for frame in leading_frames(lines, depth)]
    if kept:
        return f"{kind}: {':'.join(kept)}"
    return f"{kind}: {mask(lines[0])[:HEADER_CHARS]}" if lines else kind
