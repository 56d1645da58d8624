"""The one timing harness every backend goes through: warmup, synchronised timing, statistics.

A runner (see :mod:`deploycomp.bench.backends`) only knows how to ``run()`` one batch and
``sync()`` (wait until that work is really done). This module owns everything else, so that no
backend can be timed the wrong way:

* warmup by iterations and/or time, so first-call costs (cuDNN autotuning, ``torch.compile``,
  ORT's algorithm search, lazy allocations) never land in the timed iterations;
* each timed iteration is ``perf_counter_ns`` -> ``run()`` -> ``sync()`` -> ``perf_counter_ns``:
  exactly one synchronisation per iteration, so the latency is the time until the result exists,
  not the time to *enqueue* the work (the 0.027 ms vs 1.33 ms trap);
* the host time of ``run()`` alone (enqueue time) is recorded too: on an asynchronous device, an
  enqueue time close to the latency means the host, not the device, is the bottleneck;
* CUDA events around ``run()`` on the runner's stream give the device-side time on GPU;
* the wall time of the whole timed loop gives the throughput (batch x iterations / wall time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploycomp.errors import check

DEFAULT_WARMUP_ITERS = 5
DEFAULT_WARMUP_MS = 200.0
DEFAULT_MIN_ITERS = 10  # when neither --iters nor --duration-s is given
DEFAULT_DURATION_S = 1.0
COV_WARN_PCT = 2.5  # coefficient of variation above which the numbers are flagged as noisy
ENQUEUE_DOMINATES = 0.8  # enqueue / latency (medians) above which an async device is host-bound
FEW_ITERS = 10

STAT_KEYS = ("min", "mean", "median", "p90", "p95", "p99", "max", "std", "cov_pct")


@dataclass
class TimingConfig:
    """How long to warm up and to measure. ``None`` means the default (see the module constants).

    Iterations and time combine like trtexec's ``--iterations``/``--duration``: when both are given,
    the loop runs until *both* are reached; when only one is given, only that one counts.
    """

    warmup_iters: int | None = None  # warmup iterations (default 5)
    warmup_ms: float | None = None  # minimum warmup time in milliseconds (default 200)
    iters: int | None = None  # timed iterations
    duration_s: float | None = None  # minimum timed duration in seconds

    def validate(self) -> TimingConfig:
        check(self.iters is None or self.iters > 0,
              f"--iters must be at least 1, got {self.iters}: zero iterations measure nothing")
        check(self.duration_s is None or self.duration_s > 0, f"--duration-s must be positive, got {self.duration_s}")
        check(self.warmup_iters is None or self.warmup_iters >= 0, f"--warmup must be >= 0, got {self.warmup_iters}")
        check(self.warmup_ms is None or self.warmup_ms >= 0, f"--warmup-ms must be >= 0, got {self.warmup_ms}")
        return self

    def resolved(self) -> dict[str, Any]:
        """The effective warmup/measurement targets (defaults filled in)."""
        warm_n = DEFAULT_WARMUP_ITERS if self.warmup_iters is None else self.warmup_iters
        warm_ms = DEFAULT_WARMUP_MS if self.warmup_ms is None else self.warmup_ms
        if self.iters is None and self.duration_s is None:
            min_iters, max_iters, duration_s = DEFAULT_MIN_ITERS, None, DEFAULT_DURATION_S
        elif self.duration_s is None:
            min_iters, max_iters, duration_s = self.iters, self.iters, 0.0
        else:
            min_iters, max_iters, duration_s = self.iters or 1, None, self.duration_s
        return {"warmup_iters": warm_n, "warmup_ms": warm_ms, "min_iters": min_iters, "max_iters": max_iters,
                "duration_s": duration_s}


@dataclass
class Timing:
    """Raw result of one harness run (all times in nanoseconds, one entry per timed iteration)."""

    latency_ns: list[int]  # perf_counter_ns around run() + sync()
    enqueue_ns: list[int]  # perf_counter_ns around run() alone
    wall_ns: int  # the whole timed loop
    warmup_iters: int
    warmup_s: float
    device_ms: list[float] | None = None  # CUDA-event time of run() on the runner's stream
    h2d_ns: list[int] | None = None  # host -> device copy of the input (with --io host)
    d2h_ns: list[int] | None = None  # device -> host copy of the output (with --io host)
    targets: dict[str, Any] = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        return len(self.latency_ns)


# --------------------------------------------------------------------------------------------------
# Statistics


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """min, mean, median, p90, p95, p99, max, std and coefficient of variation of ``samples``.

    Percentiles use numpy's default (linear interpolation); ``std`` is the sample standard deviation
    (ddof=1; 0 for a single sample); ``cov_pct`` = 100 x std / mean. Units are those of ``samples``.
    """
    import numpy as np

    a = np.asarray(samples, dtype=np.float64)
    check(a.size > 0, "no samples to summarise")
    p90, p95, p99 = np.percentile(a, [90, 95, 99])
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {"min": float(a.min()), "mean": mean, "median": float(np.median(a)), "p90": float(p90),
            "p95": float(p95), "p99": float(p99), "max": float(a.max()), "std": std,
            "cov_pct": 100.0 * std / mean if mean > 0 else 0.0}


def ns_to_ms(samples: Sequence[int]) -> list[float]:
    return [s / 1e6 for s in samples]


def statistics(t: Timing, batch: int, asynchronous: bool = False) -> dict[str, Any]:
    """The published numbers of one run: latency/enqueue/device/copy statistics, throughput, warnings."""
    lat = summarize(ns_to_ms(t.latency_ns))
    enq = summarize(ns_to_ms(t.enqueue_ns))
    out: dict[str, Any] = {
        "latency_ms": lat,
        "enqueue_ms": enq,
        "device_ms": summarize(t.device_ms) if t.device_ms else None,
        "h2d_ms": summarize(ns_to_ms(t.h2d_ns)) if t.h2d_ns else None,
        "d2h_ms": summarize(ns_to_ms(t.d2h_ns)) if t.d2h_ns else None,
        "throughput_ips": batch * t.iterations / (t.wall_ns / 1e9) if t.wall_ns > 0 else None,
        "iterations": t.iterations,
        "timed_wall_s": t.wall_ns / 1e9,
        "warmup_iterations": t.warmup_iters,
        "warmup_s": t.warmup_s,
    }
    warnings = []
    if lat["cov_pct"] > COV_WARN_PCT:
        warnings.append(f"latency varies a lot (CoV {lat['cov_pct']:.1f}% > {COV_WARN_PCT}%): the machine is busy "
                        "or the run is too short; close other work, pin --threads, or use more --iters/--duration-s")
    if t.iterations < FEW_ITERS:
        warnings.append(f"only {t.iterations} timed iterations: statistics (p99 especially) are unreliable")
    if t.warmup_iters == 0:
        warnings.append("no warmup: first-call costs (allocation, autotuning, compilation) are in the timings")
    if asynchronous and lat["median"] > 0 and enq["median"] / lat["median"] > ENQUEUE_DOMINATES:
        warnings.append(f"host enqueue time ({enq['median']:.3f} ms) is {100 * enq['median'] / lat['median']:.0f}% "
                        "of the latency: the host, not the device, limits this model (launch-bound); "
                        "try a larger batch or --cuda-graph")
    out["warnings"] = warnings
    return out


# --------------------------------------------------------------------------------------------------
# The harness


def _warmup(run: Callable[[], Any], sync: Callable[[], Any], iters: int, ms: float) -> tuple[int, float]:
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(ms * 1e6)
    n = 0
    while n < iters or clock() < deadline:
        run()
        sync()
        n += 1
    return n, (clock() - start) / 1e9


def _loop(run, sync, min_iters: int, max_iters: int | None, duration_ns: int) -> tuple[list[int], list[int], int]:
    """The timed loop; kept minimal so that the harness costs well under a microsecond per iteration."""
    clock = time.perf_counter_ns
    lat: list[int] = []
    enq: list[int] = []
    add_lat, add_enq = lat.append, enq.append
    limit = max_iters if max_iters is not None else 1 << 62
    n = 0
    start = clock()
    deadline = start + duration_ns
    while True:
        t0 = clock()
        run()
        t1 = clock()
        sync()
        t2 = clock()
        add_lat(t2 - t0)
        add_enq(t1 - t0)
        n += 1
        if n >= limit or (n >= min_iters and t2 >= deadline):
            break
    return lat, enq, clock() - start


def _loop_cuda_events(run, sync, stream, min_iters, max_iters, duration_ns):
    """Like :func:`_loop`, plus a pair of CUDA events around ``run()`` on the runner's stream."""
    import torch

    clock = time.perf_counter_ns
    lat: list[int] = []
    enq: list[int] = []
    events: list[tuple[Any, Any]] = []
    limit = max_iters if max_iters is not None else 1 << 62
    n = 0
    start = clock()
    deadline = start + duration_ns
    while True:
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        t0 = clock()
        e0.record(stream)
        run()
        e1.record(stream)
        t1 = clock()
        sync()
        t2 = clock()
        lat.append(t2 - t0)
        enq.append(t1 - t0)
        events.append((e0, e1))
        n += 1
        if n >= limit or (n >= min_iters and t2 >= deadline):
            break
    wall = clock() - start
    torch.cuda.synchronize()
    return lat, enq, wall, [a.elapsed_time(b) for a, b in events]


def _time_copies(copy: Callable[[], Any], sync: Callable[[], Any], n: int) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for _ in range(max(n, 1)):
        t0 = clock()
        copy()
        sync()
        out.append(clock() - t0)
    return out


def measure(runner, config: TimingConfig | None = None, *, io: str = "device") -> Timing:
    """Warm up ``runner`` (already prepared for a batch), then time it.

    ``runner`` needs ``run()`` and ``sync()``; optional ``stream`` (a ``torch.cuda.Stream``: CUDA
    events are recorded on it) and, for ``io="host"``, ``upload()``/``download()`` (timed separately
    from the compute, so ``latency_ms`` is always device-resident compute).
    """
    config = (config or TimingConfig()).validate()
    check(io in ("device", "host"), f"--io must be 'device' or 'host', got {io!r}")
    r = config.resolved()
    run, sync = runner.run, runner.sync
    warm_n, warm_s = _warmup(run, sync, r["warmup_iters"], r["warmup_ms"])
    duration_ns = int(r["duration_s"] * 1e9)
    stream = getattr(runner, "stream", None)
    device_ms = None
    if stream is not None:
        lat, enq, wall, device_ms = _loop_cuda_events(run, sync, stream, r["min_iters"], r["max_iters"], duration_ns)
    else:
        lat, enq, wall = _loop(run, sync, r["min_iters"], r["max_iters"], duration_ns)
    h2d = d2h = None
    if io == "host":
        n = min(len(lat), 1000)
        _time_copies(runner.upload, sync, 3)  # first copies allocate / pin; not timed
        h2d = _time_copies(runner.upload, sync, n)
        _time_copies(runner.download, sync, 3)
        d2h = _time_copies(runner.download, sync, n)
    return Timing(lat, enq, wall, warm_n, warm_s, device_ms, h2d, d2h, r)
