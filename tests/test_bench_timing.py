"""The timing harness itself, with fake backends: statistics, warmup, synchronisation, overhead."""

from __future__ import annotations

import time

import numpy as np
import pytest

from deploycomp.bench.timing import TimingConfig, measure, statistics, summarize
from deploycomp.errors import UsageError


class CountingRunner:
    """Records the order of run()/sync() calls; the first ``slow_calls`` run() calls take ``slow_s``."""

    stream = None
    asynchronous = False

    def __init__(self, slow_calls: int = 0, slow_s: float = 0.0):
        self.slow_calls, self.slow_s = slow_calls, slow_s
        self.events: list[str] = []
        self.runs = 0

    def run(self):
        self.runs += 1
        self.events.append("run")
        if self.runs <= self.slow_calls:
            time.sleep(self.slow_s)

    def sync(self):
        self.events.append("sync")

    def upload(self):
        self.events.append("upload")

    def download(self):
        self.events.append("download")


class NoopRunner:
    stream = None

    def run(self):
        pass

    def sync(self):
        pass


def test_statistics_match_numpy():
    rng = np.random.default_rng(0)
    for samples in ([1.0, 2.0, 3.0, 4.0, 100.0], list(range(1, 101)), rng.lognormal(0, 0.3, 997).tolist()):
        a = np.asarray(samples, dtype=float)
        s = summarize(samples)
        assert s["min"] == a.min() and s["max"] == a.max()
        assert s["mean"] == pytest.approx(a.mean())
        assert s["median"] == pytest.approx(np.median(a))
        for q in (90, 95, 99):
            assert s[f"p{q}"] == pytest.approx(np.percentile(a, q))
        assert s["std"] == pytest.approx(a.std(ddof=1))
        assert s["cov_pct"] == pytest.approx(100 * a.std(ddof=1) / a.mean())
    known = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert known["median"] == 3.0 and known["mean"] == 22.0 and known["p90"] == pytest.approx(61.6)
    assert summarize([5.0])["std"] == 0.0


def test_median_latency_is_the_one_its_interval_is_about():
    """Skewed rounds: the pooled median of all samples lies outside the rounds' median interval (a plot's
    error bar once went negative on this); the reported median is the median of the round medians."""
    from deploycomp.bench.timing import Timing

    mids = [1.00 + 0.01 * i for i in range(20)]  # each round's median, one round per value
    blocks = [[m, m, m, 5.0, 5.0] for m in mids]
    ns = [int(v * 1e6) for b in blocks for v in b]
    st = statistics(Timing(ns, ns, sum(ns), warmup_iters=1, warmup_s=0.0, block_iters=[5] * 20), batch=1)
    lo, hi = st["latency_median_ci95_ms"]
    assert (lo, hi) == pytest.approx((1.05, 1.14))  # order statistics 6 and 15 of 20 (sign test, 95 %)
    assert st["latency_ms"]["median"] == pytest.approx(1.16)  # pooled: outside the interval
    assert st["latency_median_ms"] == pytest.approx(1.095) and lo <= st["latency_median_ms"] <= hi


def test_statistics_throughput_and_warnings():
    from deploycomp.bench.timing import Timing

    # 10 rounds of 2 iterations; the machine slows down from round to round (block medians 1.0 ... 1.9 ms)
    lat = [int(1e6 * (1 + 0.1 * i)) for i in range(10) for _ in range(2)]
    t = Timing(latency_ns=lat, enqueue_ns=[int(0.95 * x) for x in lat], wall_ns=40_000_000,
               warmup_iters=0, warmup_s=0.0, block_iters=[2] * 10)
    st = statistics(t, batch=8, asynchronous=True)
    assert st["throughput_ips"] == pytest.approx(8 * 20 / 0.040)
    assert st["rounds"] == 10 and st["block_medians_ms"] == pytest.approx([1 + 0.1 * i for i in range(10)])
    assert st["latency_median_ci95_ms"] == pytest.approx([1.1, 1.8])  # order statistics 2 and 9 of 10
    joined = " ".join(st["warnings"])
    assert "only known to within" in joined and "no warmup" in joined and "enqueue" in joined
    # Per-iteration jitter (CoV 50 %) on steady rounds is not a warning: the median is known precisely.
    steady = Timing([1_000_000, 3_000_000] * 20, [10_000] * 40, 80_000_000, 5, 0.1, block_iters=[2] * 20)
    st = statistics(steady, batch=1, asynchronous=True)
    assert st["latency_ms"]["cov_pct"] > 40 and st["warnings"] == []


def test_warmup_is_excluded_from_timed_iterations():
    runner = CountingRunner(slow_calls=5, slow_s=0.02)
    t = measure(runner, TimingConfig(warmup_iters=5, warmup_ms=0, iters=30))
    assert t.warmup_iters == 5 and t.iterations == 30
    assert max(t.latency_ns) < 10e6, "a slow first call leaked into the timed iterations"
    # The same backend without warmup: the slow calls are what gets measured (the harness is sensitive).
    cold = measure(CountingRunner(slow_calls=5, slow_s=0.02), TimingConfig(warmup_iters=0, warmup_ms=0, iters=30))
    assert sorted(cold.latency_ns)[-5] >= 19e6
    assert "no warmup" in " ".join(statistics(cold, 1)["warnings"])


def test_warmup_by_time():
    t = measure(CountingRunner(), TimingConfig(warmup_iters=0, warmup_ms=30, iters=5))
    assert t.warmup_s >= 0.03 and t.warmup_iters >= 1


def test_exactly_one_sync_per_timed_iteration():
    runner = CountingRunner()
    t = measure(runner, TimingConfig(warmup_iters=3, warmup_ms=0, iters=40))
    assert runner.events == ["run", "sync"] * (3 + 40)
    assert t.iterations == 40 and len(t.enqueue_ns) == 40
    assert all(e <= lat for e, lat in zip(t.enqueue_ns, t.latency_ns, strict=True))


def test_io_host_times_copies_separately():
    runner = CountingRunner()
    t = measure(runner, TimingConfig(warmup_iters=0, warmup_ms=0, iters=10), io="host")
    timed = runner.events[:20]
    assert timed == ["run", "sync"] * 10  # compute loop has no copies in it
    assert runner.events.count("upload") == 3 + 10 and runner.events.count("download") == 3 + 10
    assert len(t.h2d_ns) == 10 and len(t.d2h_ns) == 10


def test_iterations_and_duration_semantics():
    exact = measure(NoopRunner(), TimingConfig(warmup_iters=0, warmup_ms=0, iters=7))
    assert exact.iterations == 7
    timed = measure(NoopRunner(), TimingConfig(warmup_iters=0, warmup_ms=0, duration_s=0.05))
    assert timed.wall_ns >= 0.05e9 and timed.iterations > 7
    runner = CountingRunner(slow_calls=10**9, slow_s=0.01)
    both = measure(runner, TimingConfig(warmup_iters=0, warmup_ms=0, iters=3, duration_s=0.05))
    assert both.iterations >= 4 and both.wall_ns >= 0.05e9  # the duration, not the 3 iterations, ended it
    for bad in (TimingConfig(iters=0), TimingConfig(duration_s=0), TimingConfig(warmup_iters=-1)):
        with pytest.raises(UsageError):
            bad.validate()


def test_harness_overhead_per_iteration_is_small():
    """With a backend that does nothing, everything measured is the harness (bound: 50 us/iteration)."""
    n = 20_000
    t = measure(NoopRunner(), TimingConfig(warmup_iters=100, warmup_ms=0, iters=n))
    per_iter_us = t.wall_ns / n / 1e3
    median_us = float(np.median(t.latency_ns)) / 1e3
    assert per_iter_us < 50, f"harness costs {per_iter_us:.2f} us per iteration"
    assert median_us < 50, f"an empty iteration measures {median_us:.2f} us"


def test_compare_never_crosses_backends():
    """A speed-up is measured against the first artifact on the same backend and batch, never across backends."""
    from deploycomp.bench import compare

    def result(label, backend, batch, median, macs):
        return {"label": label, "artifact": f"{label}.x", "backend": backend, "device": "cpu", "batch": batch,
                "latency_ms": {"median": median}, "macs": macs}

    rows = compare([result("base", "torch", 1, 4.0, 100), result("base-onnx", "ort", 1, 2.0, 100),
                    result("pruned-onnx", "ort", 1, 1.0, 50), result("pruned", "torch", 1, 2.0, 50)])
    assert [(r["reference"], r["speedup"], r["macs_reduction"]) for r in rows] == [
        ("base", 1.0, 1.0), ("base-onnx", 1.0, 1.0), ("base-onnx", 2.0, 2.0), ("base", 2.0, 2.0)]
    assert rows[2]["speedup_efficiency"] == 1.0
