"""Paired comparisons: how much faster one artifact is than another, how sure we are, and a verdict.

Timing two models one after the other turns the machine's drift into a "speed-up": on a shared
2-core CPU the same model's median moves 35-45 % from one minute to the next. The harness
(:func:`deploycomp.bench.timing.measure_rounds`) therefore times every artifact in *rounds*: each
round times a short block of every artifact, in an order that changes between rounds. This module
turns those rounds into numbers:

* per round ``i``, the ratio ``r_i = median(reference block i) / median(block i)``: both blocks ran
  seconds apart, so drift slower than a round cancels in the ratio (a paired design);
* the speed-up is the geometric mean of the ``r_i`` (the mean of the log-ratios, exponentiated), and
  its 95 % interval is the paired Student-t interval of the mean log-ratio, exponentiated. The unit of
  replication is the round, not the iteration: iterations of one block share the machine's state, so
  a per-iteration interval would be far too narrow (Kalibera & Jones, "Rigorous Benchmarking in
  Reasonable Time", ISMM 2013, make the same point and build intervals from the higher level of
  repetition). A percentile bootstrap over rounds (Efron & Tibshirani 1993, ch. 13) was tried first:
  with 10-20 rounds it covered only 92-94 % in seeded A/A simulations (per-iteration noise, spikes and
  drift, as in tests/test_bench_compare.py), the t interval 95-96 %, so the t interval it is;
* the verdict: ``faster`` when the whole interval lies above 1 *and* the speed-up is at least
  ``1 + margin``; ``slower`` symmetrically; otherwise ``same``. The margin (default 2 %) is the
  smallest difference worth acting on, as pyperf's ``compare_to --min-speed`` ignores differences below
  a threshold and reports "not significant" from a significance test (torch.utils.benchmark's
  ``Measurement`` judges a timing by its relative IQR the same way, and times blocks of runs).

Everything here is pure numpy: no model, no timing, so the statistics are tested with fake data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
DEFAULT_MARGIN_PCT = 2.0  # |speed-up - 1| below this is "same", significant or not
MIN_ROUNDS = 5  # fewer rounds give no interval and no verdict (4 degrees of freedom at least)
VERDICTS = ("faster", "slower", "same")


@dataclass(frozen=True)
class Speedup:
    """The paired speed-up of a candidate against a reference (reference latency / candidate latency)."""

    speedup: float  # geometric mean over rounds of the per-round ratio of block medians
    ci95: tuple[float, float] | None  # Student-t interval (None: too few rounds or sessions)
    verdict: str | None  # faster / slower / same (None without an interval)
    rounds: int  # rounds the estimate rests on (over all sessions)
    sessions: int = 1  # sessions (fresh processes) it rests on; 1: the interval is over one session's rounds

    def as_dict(self) -> dict:
        return {"speedup": self.speedup, "speedup_ci95": list(self.ci95) if self.ci95 else None,
                "verdict": self.verdict, "rounds": self.rounds, "sessions": self.sessions}


def log_ratios(reference: Sequence[float], candidate: Sequence[float]):
    """Per-round ``log(reference / candidate)`` of block medians (any unit, the same for both)."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 1:
        raise ValueError(f"paired samples must have the same length, got {ref.shape} and {cand.shape}")
    if (ref <= 0).any() or (cand <= 0).any():
        raise ValueError("block medians must be positive")
    return np.log(ref) - np.log(cand)


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution (closed forms for 1 and 2 degrees of freedom; above, the
    Cornish-Fisher expansion of Abramowitz & Stegun 26.7.5, within 1e-3 of the exact value from 3 on)."""
    from statistics import NormalDist

    if df < 1:
        raise ValueError("Student's t needs at least one degree of freedom")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    v = float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (at least two values)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n < 2:
        raise ValueError("an interval needs at least two values")
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * float(v.std(ddof=1)) / math.sqrt(n)
    m = float(v.mean())
    return m - half, m + half


def verdict(speedup: float, ci: tuple[float, float], margin_pct: float = DEFAULT_MARGIN_PCT) -> str:
    """``faster`` / ``slower`` when the interval excludes 1 and the effect reaches the margin, else ``same``."""
    low, high = ci
    margin = 1.0 + margin_pct / 100.0
    if low > 1.0 and speedup >= margin:
        return "faster"
    if high < 1.0 and speedup <= 1.0 / margin:
        return "slower"
    return "same"


def paired_speedup(reference: Sequence[float], candidate: Sequence[float], *, margin_pct: float = DEFAULT_MARGIN_PCT,
                   confidence: float = CONFIDENCE) -> Speedup:
    """Speed-up of ``candidate`` over ``reference`` from per-round block medians (same rounds, same order)."""
    d = log_ratios(reference, candidate)
    est = math.exp(float(d.mean()))
    if d.size < MIN_ROUNDS:
        return Speedup(est, None, None, int(d.size))
    lo, hi = mean_interval(d, confidence)
    ci = (math.exp(lo), math.exp(hi))
    return Speedup(est, ci, verdict(est, ci, margin_pct), int(d.size))


# The spread of a paired speed-up between bench runs minutes apart that the sessions of one run (seconds
# apart) do not sample, as a standard deviation in per cent (of the speed-up, in log terms). Measured by
# benchmarks/bench_ab.py (results/bench_ab.md, "Levels"): on an idle 2-core machine the runs' speed-ups
# spread more than their sessions predicted, and intervals from the sessions alone held the other runs'
# estimate in too few runs. A run cannot sample this level itself, so its variance is added as a known term.
RUN_SPREAD_PCT = 1.0


def across_sessions(session_speedups: Sequence[float], rounds: int, *, margin_pct: float = DEFAULT_MARGIN_PCT,
                    confidence: float = CONFIDENCE, run_spread_pct: float = RUN_SPREAD_PCT) -> Speedup:
    """The speed-up over several sessions, each a fresh process loading every model (a multi-level design).

    Rounds inside one session share that session's state (where the weights landed in memory, which
    cores the threads run on, ...), so a second session of the same pair can land outside the first one's
    interval. Kalibera & Jones (ISMM 2013) build the interval from the highest level that is replicated:
    here the session. Each session gives one paired speed-up (the geometric mean of its round ratios); the
    estimate is their geometric mean. The interval combines two terms in log space: the Student-t term of
    the mean over sessions (sessions - 1 degrees of freedom; it already carries the rounds' noise, which is
    in each session's estimate) and a normal term for the level above, runs minutes apart, which one run
    cannot replicate: its standard deviation ``run_spread_pct`` was measured beforehand (``RUN_SPREAD_PCT``),
    as Kalibera & Jones do for a level whose variance is known from an initial experiment. Half-width:
    ``sqrt((t * s / sqrt(n))**2 + (z * run_spread)**2)``.
    """
    from statistics import NormalDist

    logs = [math.log(s) for s in session_speedups]
    if not logs or min(session_speedups) <= 0:
        raise ValueError("session speed-ups must be positive")
    n = len(logs)
    mean = sum(logs) / n
    est = math.exp(mean)
    if n < 2:
        return Speedup(est, None, None, rounds, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    sessions_half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    run_half = NormalDist().inv_cdf(0.5 + confidence / 2.0) * math.log1p(run_spread_pct / 100.0)
    half = math.hypot(sessions_half, run_half)
    ci = (math.exp(mean - half), math.exp(mean + half))
    return Speedup(est, ci, verdict(est, ci, margin_pct), rounds, n)


def geometric_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """Geometric mean of positive ``values`` (e.g. sessions' median latencies) and its t interval (2+ values)."""
    logs = [math.log(v) for v in values]
    lo, hi = mean_interval(logs, confidence)
    return math.exp(sum(logs) / len(logs)), (math.exp(lo), math.exp(hi))


def paired_between(reference: dict, result: dict, margin_pct: float = DEFAULT_MARGIN_PCT) -> Speedup | None:
    """The paired speed-up of one bench result over another, or None when they were not timed together.

    Both must come from the same bench run (``session``, the run's id). With several sessions the speed-up
    rests on the sessions (:func:`across_sessions`); with one, on that session's rounds
    (:func:`paired_speedup`; also bench records of schema 2, which have no ``sessions`` list).
    """
    if not reference.get("session") or reference.get("session") != result.get("session"):
        return None
    sa, sb = reference.get("sessions") or [], result.get("sessions") or []
    if len(sa) >= 2 and len(sa) == len(sb):
        per = [paired_speedup(a["block_medians_ms"], b["block_medians_ms"], margin_pct=margin_pct)
               for a, b in zip(sa, sb, strict=True)]
        return across_sessions([p.speedup for p in per], sum(p.rounds for p in per), margin_pct=margin_pct)
    a, b = reference.get("block_medians_ms") or [], result.get("block_medians_ms") or []
    if len(a) != len(b) or not a:
        return None
    return paired_speedup(a, b, margin_pct=margin_pct)


DRIFT_MIN_WINDOW = 3  # rounds at each end of a session that the drift compares (at least)
DRIFT_WARN_PCT = 10.0  # the reference's end-of-session latency this far from its start one: a warning


def median_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Distribution-free interval of the median of ``values`` (order statistics, binomial; the sign-test
    interval, e.g. Conover, "Practical Nonparametric Statistics", 1999, sec. 3.2). None below 6 values."""
    import numpy as np

    v = np.sort(np.asarray(values, dtype=np.float64))
    n = v.size
    # largest k with P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2: the interval is [v_(k), v_(n-k+1)]
    tail = (1.0 - confidence) / 2.0
    cdf, k = 0.0, 0
    while k < n:
        p = math.comb(n, k) / 2.0**n
        if cdf + p > tail:
            break
        cdf += p
        k += 1
    if k == 0:
        return None
    return float(v[k - 1]), float(v[n - k])


def relative_drift(first: float, last: float) -> float:
    """``last / first - 1``: how much slower (positive) the machine ran the same work at the end."""
    return last / first - 1.0


def drift_windows(block_medians: Sequence[float], final: float) -> tuple[float, float, int]:
    """The reference's median latency at the start and at the end of a session, and the window size.

    Start: the median of the first ``k`` round medians; end: the median of the last ``k - 1`` and the
    extra block timed after the last round; ``k`` = a quarter of the rounds, at least 3. One block
    against another is noise, not drift: on the idle 2-core machine of ``results/bench_ab.md`` the first
    and the final block of the same model differed by -20 % to +50 %.
    """
    import numpy as np

    k = max(DRIFT_MIN_WINDOW, len(block_medians) // 4)
    start = float(np.median(block_medians[:k]))
    end = float(np.median([*block_medians[len(block_medians) - (k - 1):], final]))
    return start, end, k


def fmt_interval(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``1.02 [0.99, 1.05]`` with ``digits`` significant digits (just the value without an interval)."""
    if value is None:
        return "-"
    text = f"{value:.{digits}g}"
    return text + (f" [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]" if ci else "")


def fmt_speedup(speedup: float | None, ci: Sequence[float] | None, verdict_: str | None = None) -> str:
    """``1.56 [1.50, 1.62] faster`` (or just ``1.56`` without an interval)."""
    if speedup is None:
        return ""
    text = f"{speedup:.2f}"
    if ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    if verdict_:
        text += f" {verdict_}"
    return text
