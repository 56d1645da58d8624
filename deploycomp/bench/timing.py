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
* the wall time of the whole timed loop gives the throughput (batch x iterations / wall time);
* several runners are timed *in rounds* (:func:`measure_rounds`): every round times a short block of
  each runner, in an order that changes from round to round (a seeded shuffle, mirrored in the next
  round: A B C | C B A | B A C | C A B ...), so that the machine's drift lands on every runner alike
  and a comparison can be paired round by round (:mod:`deploycomp.bench.paired`). One runner is
  timed the same way (its blocks give the interval of its median latency).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deploycomp.errors import check

DEFAULT_WARMUP_ITERS = 5
DEFAULT_WARMUP_MS = 200.0
DEFAULT_MIN_ITERS = 10  # when neither --iters nor --duration-s is given
DEFAULT_DURATION_S = 0.3  # per artifact and session (5 sessions by default: 1.5 s in all)
DEFAULT_ROUNDS = 10  # blocks per artifact and session; each round times one block of every artifact
NOISY_PCT = 5.0  # the median's 95 % interval reaching further than this from the median: flagged
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
    iters: int | None = None  # timed iterations (per artifact, over all rounds of one session)
    duration_s: float | None = None  # minimum timed duration in seconds (per artifact and session)
    rounds: int | None = None  # blocks per artifact and session (default 10); 1 = one block each, one after another
    budget_s: float | None = None  # stop starting new rounds once the timed rounds took this long

    def validate(self) -> TimingConfig:
        check(self.iters is None or self.iters > 0,
              f"--iters must be at least 1, got {self.iters}: zero iterations measure nothing")
        check(self.duration_s is None or self.duration_s > 0, f"--duration-s must be positive, got {self.duration_s}")
        check(self.warmup_iters is None or self.warmup_iters >= 0, f"--warmup must be >= 0, got {self.warmup_iters}")
        check(self.warmup_ms is None or self.warmup_ms >= 0, f"--warmup-ms must be >= 0, got {self.warmup_ms}")
        check(self.rounds is None or self.rounds >= 1,
              f"--rounds must be at least 1, got {self.rounds} (10 is the default; 1 times each artifact once)")
        check(self.budget_s is None or 0 < self.budget_s < math.inf,
              f"--budget-s must be positive and finite, got {self.budget_s}")
        return self

    def resolved(self) -> dict[str, Any]:
        """The effective warmup/measurement targets (defaults filled in).

        ``min_iters``/``max_iters``/``duration_s`` are totals per artifact; ``rounds`` blocks share them
        (with ``--iters N`` alone, exactly N iterations, so at most N rounds).
        """
        warm_n = DEFAULT_WARMUP_ITERS if self.warmup_iters is None else self.warmup_iters
        warm_ms = DEFAULT_WARMUP_MS if self.warmup_ms is None else self.warmup_ms
        if self.iters is None and self.duration_s is None:
            min_iters, max_iters, duration_s = DEFAULT_MIN_ITERS, None, DEFAULT_DURATION_S
        elif self.duration_s is None:
            min_iters, max_iters, duration_s = self.iters, self.iters, 0.0
        else:
            min_iters, max_iters, duration_s = self.iters or 1, None, self.duration_s
        rounds = DEFAULT_ROUNDS if self.rounds is None else self.rounds
        if max_iters is not None:
            rounds = min(rounds, max_iters)
        return {"warmup_iters": warm_n, "warmup_ms": warm_ms, "min_iters": min_iters, "max_iters": max_iters,
                "duration_s": duration_s, "rounds": rounds, "budget_s": self.budget_s}


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
    block_iters: list[int] | None = None  # iterations of each round's block, in round order (None: one block)
    final_ns: list[int] | None = None  # the reference's extra block after the last round (drift check)
    conditions: dict[str, Any] = field(default_factory=dict)  # load, other processes' CPU, order, pinning

    @property
    def iterations(self) -> int:
        return len(self.latency_ns)

    @property
    def rounds(self) -> int:
        return len(self.block_iters) if self.block_iters else 1

    def block_medians_ms(self) -> list[float]:
        """Median latency of each round's block (ms), in round order."""
        import numpy as np

        sizes = self.block_iters or [len(self.latency_ns)]
        out, start = [], 0
        for n in sizes:
            out.append(float(np.median(self.latency_ns[start:start + n])) / 1e6)
            start += n
        return out


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
    import numpy as np

    from deploycomp.bench.paired import median_interval

    lat = summarize(ns_to_ms(t.latency_ns))
    enq = summarize(ns_to_ms(t.enqueue_ns))
    blocks = t.block_medians_ms()
    ci = median_interval(blocks) if len(blocks) > 1 else None
    out: dict[str, Any] = {
        "latency_ms": lat,
        # The median the interval (and the paired speed-up) is about: the median of the rounds' medians.
        # With one round it is the median of all samples; with several it can differ from that pooled
        # median (latency_ms.median), which may lie outside the interval.
        "latency_median_ms": float(np.median(blocks)),
        "latency_median_ci95_ms": list(ci) if ci else None,
        "block_medians_ms": blocks,
        "rounds": t.rounds,
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
    out["warnings"] = timing_warnings(out["latency_median_ms"], ci, f"over {t.rounds} rounds", t.iterations,
                                      t.warmup_iters, enq["median"], asynchronous)
    return out


def timing_warnings(median: float, ci: Sequence[float] | None, covers: str, iterations: int, warmup_iters: int,
                    enqueue_median: float, asynchronous: bool) -> list[str]:
    """Warnings that mean something: each says what is wrong and what to do, and none fires on a good run.

    ``median`` is the median latency reported with its interval ``ci``, which is ``covers`` (e.g. "over 10
    rounds", "across 5 sessions"); ``iterations`` and ``warmup_iters`` are those of one session.
    """
    warnings = []
    if ci is not None and median > 0:
        spread = 100.0 * max(median - ci[0], ci[1] - median) / median
        if spread > NOISY_PCT:
            warnings.append(f"the median latency is only known to within {spread:.0f}% (95% interval "
                            f"[{ci[0]:.3g}, {ci[1]:.3g}] ms {covers}): the machine is busy or drifting; "
                            "close other work, pin --threads/--pin-cores, or add --sessions")
    if iterations < FEW_ITERS:
        warnings.append(f"only {iterations} timed iterations: statistics (p99 especially) are unreliable")
    if warmup_iters == 0:
        warnings.append("no warmup: first-call costs (allocation, autotuning, compilation) are in the timings")
    if asynchronous and median > 0 and enqueue_median / median > ENQUEUE_DOMINATES:
        warnings.append(f"host enqueue time ({enqueue_median:.3f} ms) is {100 * enqueue_median / median:.0f}% "
                        "of the latency: the host, not the device, limits this model (launch-bound); "
                        "try a larger batch or --cuda-graph")
    return warnings


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


def _block_targets(r: dict[str, Any], rounds: int, i: int) -> tuple[int, int | None, int]:
    """(min_iters, max_iters, duration_ns) of block ``i`` of ``rounds``: the per-artifact totals, shared out."""
    if r["max_iters"] is not None:  # exactly N iterations: spread them over the rounds
        n = r["max_iters"] // rounds + (1 if i < r["max_iters"] % rounds else 0)
        return n, n, int(r["duration_s"] * 1e9 / rounds)
    return max(1, -(-r["min_iters"] // rounds)), None, int(r["duration_s"] * 1e9 / rounds)


def round_orders(n: int, rounds: int, seed: int = 0) -> list[list[int]]:
    """The order of ``n`` runners in each round: a seeded shuffle, then its mirror image, and so on.

    Each pair of rounds puts every runner once early and once late, so a drift that is linear over a
    pair of rounds costs every runner the same (A B | B A is the classic ABBA design for two).
    """
    import random

    rng = random.Random(seed)
    orders = []
    for i in range(rounds):
        if i % 2 == 0:
            order = list(range(n))
            if i > 0:
                rng.shuffle(order)
            orders.append(order)
        else:
            orders.append(orders[-1][::-1])
    return orders


def measure_rounds(runners: Sequence[Any], config: TimingConfig | None = None, *, io: str = "device",
                   seed: int = 0, final_reference: bool = True,
                   progress: Callable[[int, int], Any] | None = None) -> list[Timing]:
    """Warm up every runner (each already prepared for a batch), then time them in interleaved rounds.

    Every round times one block of each runner, in the order :func:`round_orders` gives. With more than
    one runner and ``final_reference``, the first runner (the reference of the comparison) gets one more
    block after the last round: comparing it with its first block shows how much the machine drifted.
    ``--budget-s`` stops starting new rounds once the timed rounds took that long (warmup excluded).
    Returns one :class:`Timing` per runner, in the order given.
    """
    from deploycomp.bench.conditions import Conditions

    config = (config or TimingConfig()).validate()
    check(io in ("device", "host"), f"--io must be 'device' or 'host', got {io!r}")
    check(len(runners) > 0, "nothing to time")
    r = config.resolved()
    cond = Conditions.start()
    warm = [_warmup(x.run, x.sync, r["warmup_iters"], r["warmup_ms"]) for x in runners]
    n = len(runners)
    lat: list[list[int]] = [[] for _ in runners]
    enq: list[list[int]] = [[] for _ in runners]
    dev: list[list[float]] = [[] for _ in runners]
    sizes: list[list[int]] = [[] for _ in runners]
    wall = [0] * n
    budget_ns = int(r["budget_s"] * 1e9) if r["budget_s"] else None
    orders = round_orders(n, r["rounds"], seed)
    start = time.perf_counter_ns()
    for i, order in enumerate(orders):
        targets = _block_targets(r, r["rounds"], i)
        for j in order:
            b_lat, b_enq, b_wall, b_dev = _block(runners[j], *targets)
            lat[j] += b_lat
            enq[j] += b_enq
            dev[j] += b_dev or []
            sizes[j].append(len(b_lat))
            wall[j] += b_wall
        if progress is not None:
            progress(i + 1, len(orders))
        if budget_ns is not None and time.perf_counter_ns() - start >= budget_ns:
            break
    final = None
    if final_reference and n > 1:
        final = _block(runners[0], *_block_targets(r, r["rounds"], 0))[0]
    conditions = cond.finish()
    conditions["order"] = [list(o) for o in orders[:len(sizes[0])]]
    out = []
    for j, x in enumerate(runners):
        h2d = d2h = None
        if io == "host":
            k = min(len(lat[j]), 1000)
            _time_copies(x.upload, x.sync, 3)  # first copies allocate / pin; not timed
            h2d = _time_copies(x.upload, x.sync, k)
            _time_copies(x.download, x.sync, 3)
            d2h = _time_copies(x.download, x.sync, k)
        out.append(Timing(lat[j], enq[j], wall[j], warm[j][0], warm[j][1], dev[j] or None, h2d, d2h, r, sizes[j],
                          final if j == 0 else None, conditions))
    return out


def _block(runner, min_iters: int, max_iters: int | None, duration_ns: int):
    """One block of timed iterations of ``runner``: (latency_ns, enqueue_ns, wall_ns, device_ms or None)."""
    stream = getattr(runner, "stream", None)
    if stream is not None:
        return _loop_cuda_events(runner.run, runner.sync, stream, min_iters, max_iters, duration_ns)
    return (*_loop(runner.run, runner.sync, min_iters, max_iters, duration_ns), None)


def measure(runner, config: TimingConfig | None = None, *, io: str = "device") -> Timing:
    """Warm up ``runner`` (already prepared for a batch), then time it in rounds of blocks.

    ``runner`` needs ``run()`` and ``sync()``; optional ``stream`` (a ``torch.cuda.Stream``: CUDA
    events are recorded on it) and, for ``io="host"``, ``upload()``/``download()`` (timed separately
    from the compute, so ``latency_ms`` is always device-resident compute).
    """
    return measure_rounds([runner], config, io=io)[0]
