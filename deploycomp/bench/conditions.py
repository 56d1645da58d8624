"""The state of the machine while a benchmark ran: load, other processes' CPU time, CPU pinning.

A timing taken while something else ran on the machine is slower and noisier than one taken on an
idle machine, and says nothing about that by itself. So every timed session records:

* the 1-minute load average before and after (``os.getloadavg``; it lags by about a minute and
  counts this process too, so it is recorded, not judged);
* the CPU time *other* processes used while the rounds ran, as a share of the machine's CPUs
  (``/proc/stat`` busy time of all CPUs minus this process's own time from ``/proc/self/stat``):
  this one is judged, because it measures exactly the competition the timing had.

``pin_cores`` restricts this process (every thread it has, and so every thread it starts later) to
some CPUs, the usual way to keep a benchmark off the cores the OS and other work favour.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from deploycomp.errors import UsageError

OTHER_CPU_WARN_PCT = 10.0  # other processes using more than this share of the CPUs while timing: flagged


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def _own_jiffies() -> int | None:
    """CPU time (user + system, all threads) of this process in jiffies."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Conditions:
    """Started before a timed session, finished after it; ``finish()`` gives the record."""

    load_before: float | None
    cpu_before: tuple[int, int] | None
    own_before: int | None
    t0: float

    @classmethod
    def start(cls) -> Conditions:
        return cls(_loadavg(), _cpu_jiffies(), _own_jiffies(), time.monotonic())

    def finish(self) -> dict[str, Any]:
        cpu, own = _cpu_jiffies(), _own_jiffies()
        other = None
        if None not in (cpu, own, self.cpu_before, self.own_before):
            busy = cpu[0] - self.cpu_before[0]
            total = cpu[1] - self.cpu_before[1]
            mine = own - self.own_before
            if total > 0:
                other = round(100.0 * max(0, busy - mine) / total, 1)
        return {"load_avg_1m_before": self.load_before, "load_avg_1m_after": _loadavg(),
                "other_cpu_pct": other, "seconds": round(time.monotonic() - self.t0, 3),
                "pinned_cpus": pinned_cpus()}


def conditions_warning(cond: dict[str, Any]) -> str | None:
    """One line when other processes competed for the CPUs during the timing."""
    other = cond.get("other_cpu_pct")
    if other is None or other <= OTHER_CPU_WARN_PCT:
        return None
    return (f"other processes used {other:.0f}% of the machine's CPU time while this was timed (load average "
            f"{cond.get('load_avg_1m_before')} before, {cond.get('load_avg_1m_after')} after): latencies are "
            "slower and noisier than on an idle machine; re-run when it is idle")


def pinned_cpus() -> list[int] | None:
    """The CPUs this process may run on, when that is fewer than the machine has (None: not restricted)."""
    try:
        mine = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None
    return mine if len(mine) < (os.cpu_count() or len(mine)) else None


def parse_cpu_list(text: str) -> list[int]:
    """``0``, ``0,2`` or ``2-3`` (the taskset / cgroup cpuset notation) -> sorted CPU numbers."""
    cpus: set[int] = set()
    try:
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
            if a < 0 or b < a:
                raise ValueError
            cpus.update(range(a, b + 1))
    except ValueError:
        cpus = set()
    if not cpus:
        raise UsageError(f"--pin-cores takes CPU numbers like 0 or 0,1 or 2-3, got {text!r}")
    return sorted(cpus)


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


@contextlib.contextmanager
def pin_cores(cpus: list[int] | None) -> Iterator[list[int] | None]:
    """Run the block on ``cpus`` only (all threads of this process; new threads inherit it), then restore."""
    if not cpus:
        yield None
        return
    if not hasattr(os, "sched_setaffinity"):
        raise UsageError("--pin-cores needs Linux (os.sched_setaffinity); leave it out on this system")
    allowed = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - allowed)
    if missing:
        raise UsageError(f"--pin-cores {','.join(map(str, cpus))}: CPU {missing[0]} is not available to this "
                         f"process (available: {','.join(map(str, sorted(allowed)))})")
    before = {t: os.sched_getaffinity(t) for t in _threads()}
    for t in before:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(t, cpus)
    try:
        yield cpus
    finally:
        for t in _threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(t, before.get(t, allowed))
