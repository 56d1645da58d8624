"""Sessions: what makes a benchmark's interval hold when the benchmark is run again.

Rounds inside one session share that session's state: where the weights landed in memory, the thread
pools, the address-space layout. Loaded again, the same pair of models lands somewhere else, and a
one-session "95 %" interval held the next run's estimate in only 2 of 10 re-runs (issue 21,
``benchmarks/results/bench_ab.md``). So ``bench`` replicates at the level that varies: it runs
``--sessions N`` sessions (5 by default), each in a fresh process (:mod:`deploycomp.bench.worker`) that
loads every artifact anew, warms up, and times them in interleaved rounds. Then:

* a speed-up is the geometric mean of the sessions' paired speed-ups, with the Student-t interval across
  sessions widened by a known term for runs minutes apart, a level one run cannot sample
  (:func:`deploycomp.bench.paired.across_sessions`, ``RUN_SPREAD_PCT``; Kalibera & Jones' multi-level design);
* a median latency is the geometric mean of the sessions' medians, with the t interval across sessions;
* percentiles, throughput and the other statistics pool every session's iterations.

Every result says what its interval covers (``interval``): "across 5 sessions (fresh processes)" or,
with ``--sessions 1``, "within one session (10 rounds)", which is what a re-run does *not* promise.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

DEFAULT_SESSIONS = 5
MAX_SESSIONS = 100
SAMPLE_KEYS = ("latency_ms", "enqueue_ms", "device_ms", "h2d_ms", "d2h_ms")


def covers(sessions: int, rounds: int) -> str:
    """What an interval over ``sessions`` sessions of ``rounds`` rounds each covers, in words."""
    if sessions > 1:
        return f"across {sessions} sessions (fresh processes)"
    return f"within one session ({rounds} rounds)"


def run_sessions(job: dict[str, Any], sessions: int, progress: Callable[[int, int], Any] | None = None
                 ) -> list[dict]:
    """Run ``sessions`` sessions of ``job`` and combine them into one result per (artifact, batch).

    One session runs in this process (today's state of the process is then part of it); several run one
    after another, each in a fresh process, never two at once (they would compete for the cores).
    """
    from deploycomp.bench.run import run_job
    from deploycomp.bench.worker import run_isolated

    per_session = []
    for i in range(sessions):
        if progress is not None:
            progress(i + 1, sessions)
        session_job = {**job, "kind": "timing", "session_index": i}
        per_session.append((run_job(session_job) if sessions == 1 else run_isolated(session_job))["results"])
    return combine(per_session)


def combine(per_session: list[list[dict]]) -> list[dict]:
    """One result per (artifact, batch) from the sessions' results (each session's list in the same order)."""
    run_id = uuid.uuid4().hex[:12]
    return [combine_records(list(group), run_id) for group in zip(*per_session, strict=True)]


def combine_records(rs: list[dict], run_id: str) -> dict:
    """The record of one (artifact, batch) over its sessions ``rs``: pooled statistics, intervals across sessions."""
    import numpy as np

    from deploycomp.bench.paired import geometric_interval
    from deploycomp.bench.timing import summarize, timing_warnings

    first = rs[0]
    out = {k: v for k, v in first.items() if not k.startswith("_")}
    pooled = {k: [x for r in rs for x in ((r.get("_samples") or {}).get(k) or [])] for k in SAMPLE_KEYS}
    for k in SAMPLE_KEYS:
        out[k] = summarize(pooled[k]) if pooled[k] else first.get(k)
    n = len(rs)
    medians = [r["latency_median_ms"] for r in rs]
    if n > 1:
        median, ci = geometric_interval(medians)
        ci = list(ci)
    else:
        median, ci = first["latency_median_ms"], first.get("latency_median_ci95_ms")
    iterations = sum(r["iterations"] for r in rs)
    wall = sum(r["timed_wall_s"] for r in rs)
    out.update({
        "session": run_id,
        "latency_median_ms": median,
        "latency_median_ci95_ms": ci,
        "interval": covers(n, first["rounds"]),
        "sessions": [_session_entry(r) for r in rs],
        "block_medians_ms": [b for r in rs for b in r["block_medians_ms"]],
        "rounds": sum(r["rounds"] for r in rs),
        "iterations": iterations,
        "timed_wall_s": wall,
        "warmup_iterations": sum(r["warmup_iterations"] for r in rs),
        "warmup_s": sum(r["warmup_s"] for r in rs),
        "throughput_ips": first["batch"] * iterations / wall if wall > 0 else None,
        "conditions": _conditions(rs),
    })
    enqueue = out["enqueue_ms"]["median"] if out.get("enqueue_ms") else 0.0
    asynchronous = out.get("device_ms") is not None or str(out.get("device", "")).startswith("cuda")
    out["warnings"] = timing_warnings(median, ci, out["interval"], int(np.min([r["iterations"] for r in rs])),
                                      min(r["warmup_iterations"] for r in rs), enqueue, asynchronous)
    return out


def _session_entry(r: dict) -> dict[str, Any]:
    return {"session": r["session"], "latency_median_ms": r["latency_median_ms"],
            "latency_median_ci95_ms": r.get("latency_median_ci95_ms"), "rounds": r["rounds"],
            "iterations": r["iterations"], "block_medians_ms": r["block_medians_ms"],
            "conditions": r.get("conditions") or {}}


def _conditions(rs: list[dict]) -> dict[str, Any]:
    """The machine's state over the sessions: the worst drift, the most CPU others used, load before/after."""
    conds = [r.get("conditions") or {} for r in rs]
    drifted = [c for c in conds if c.get("drift_pct") is not None]
    out = dict(max(drifted, key=lambda c: abs(c["drift_pct"])) if drifted else conds[0])
    out.pop("order", None)  # each session's round order stays in its entry of ``sessions``
    others = [c["other_cpu_pct"] for c in conds if c.get("other_cpu_pct") is not None]
    out.update({"load_avg_1m_before": conds[0].get("load_avg_1m_before"),
                "load_avg_1m_after": conds[-1].get("load_avg_1m_after"),
                "other_cpu_pct": max(others) if others else None,
                "seconds": round(sum(c.get("seconds") or 0.0 for c in conds), 3), "sessions": len(rs)})
    return out
