"""Wall-clock phases of one command (imports, plugin discovery, pipeline validation, hashing, session
creation, ...), logged to stderr at exit when ``$HIERARCHY_PHASES`` is set. ``bench_startup.py``
reads them for its cold-start breakdown. Off (the default) a phase costs one dict lookup.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

ENV = "HIERARCHY_PHASES"
PREFIX = "phase "  # each reported line: "phase NAME: 12.3 ms" (nested phases are indented)

_totals: dict[str, float] = {}  # name -> seconds, in first-seen order
_depth: dict[str, int] = {}
_stack: list[str] = []
_start_offset: list[float | None] = []  # since_process_start() when the first phase began


def enabled() -> bool:
    return bool(os.environ.get(ENV))


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as ``name`` (added up when it runs more than once, e.g. once per stage)."""
    if not enabled():
        yield
        return
    if not _start_offset:
        _start_offset.append(since_process_start())
    _depth.setdefault(name, len(_stack))
    _totals.setdefault(name, 0.0)  # reported in the order phases begin
    _stack.append(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        _totals[name] += time.perf_counter() - start
        _stack.pop()


def since_process_start() -> float | None:
    """Seconds since this process started (Linux, 10 ms resolution), None where unknown."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def report() -> list[str]:
    """The phase lines, also written to stderr (nothing when disabled): the interpreter's start up to
    the first phase, every phase, and the whole process so far."""
    if not enabled():
        return []
    lines = [f"{PREFIX}{'  ' * _depth[n]}{n}: {t * 1000:.1f} ms" for n, t in _totals.items()]
    if _start_offset and _start_offset[0] is not None:
        lines.insert(0, f"{PREFIX}interpreter start: {_start_offset[0] * 1000:.0f} ms (10 ms resolution)")
    total = since_process_start()
    if total is not None:
        lines.append(f"{PREFIX}process total: {total * 1000:.0f} ms")
    print("\n".join(lines), file=sys.stderr, flush=True)
    _totals.clear()  # a second command in this process starts afresh
    _depth.clear()
    return lines
