"""One benchmark session: load every artifact of a job, then time them together, batch size by batch size.

A session is what one process does between loading the models and freeing them. ``deploycomp bench``
runs several, each in a fresh process (:mod:`deploycomp.bench.worker`), and combines them
(:mod:`deploycomp.bench.sessions`); ``--sessions 1`` runs one in the calling process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.bench import SCHEMA_VERSION, BenchConfig


def _job_pairs(job: dict[str, Any]) -> list[tuple[str, str]]:
    if "artifacts" in job:
        return [(str(a), b) for a, b in job["artifacts"]]
    return [(str(job["artifact"]), job["backend"])]  # a one-artifact job (schema of deploycomp <= 0.1)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One session: load every artifact of the job, then time them together, batch size by batch size.

    ``job``: ``artifacts`` ([path, backend] pairs), ``config`` (a :class:`BenchConfig` as a dict) and
    ``session_index`` (which session of a run this is: it seeds the round order, so that sessions differ
    in order as well as in placement). Each record keeps its raw per-iteration samples under ``_samples``
    for :func:`deploycomp.bench.sessions.combine`, which pools them over the sessions.
    """
    import contextlib
    import uuid

    from deploycomp.bench import env
    from deploycomp.bench.backends import get_backend
    from deploycomp.bench.conditions import pin_cores
    from deploycomp.bench.timing import measure_rounds, statistics

    cfg = BenchConfig(**{**job["config"], "batches": tuple(job["config"]["batches"]),
                         "pin_cores": tuple(job["config"]["pin_cores"]) if job["config"].get("pin_cores") else None})
    index = int(job.get("session_index", 0))
    pairs = _job_pairs(job)
    for _, backend in pairs:
        get_backend(backend).preload()
    timing_cfg = cfg.timing()
    options = cfg.runner_options()
    records: list[list[dict]] = [[] for _ in pairs]  # per artifact: results in artifact order, then batch
    with pin_cores(list(cfg.pin_cores) if cfg.pin_cores else None), contextlib.ExitStack() as stack:
        if cfg.pin_cores and options.threads is None:
            options.threads = len(cfg.pin_cores)  # one intra-op thread per pinned core
        options.interleaved = len(pairs) > 1
        # the load order alternates between sessions: an artifact loaded second may land in memory
        # differently from one loaded first, and no artifact should always be the second
        order = list(range(len(pairs)))[::-1] if index % 2 else list(range(len(pairs)))
        loaded = {i: stack.enter_context(get_backend(pairs[i][1])(pairs[i][0], options)) for i in order}
        runners = [loaded[i] for i in range(len(pairs))]
        for batch in cfg.batches:
            what = runners[0].describe().get("label") if len(runners) == 1 else f"{len(runners)} models"
            backends = ", ".join(dict.fromkeys(x.name for x in runners))
            with console.status_line(f"benchmarking {what} ({backends}, {runners[0].device}, batch {batch})") as show:
                for x in runners:
                    x.prepare(batch)
                timings = measure_rounds(runners, timing_cfg, io=cfg.io, seed=cfg.seed + index,
                                         progress=lambda i, n: show(f"round {i}/{n}"))
            session = uuid.uuid4().hex[:12]
            for j, (x, t) in enumerate(zip(runners, timings, strict=True)):
                stats = statistics(t, batch, asynchronous=x.asynchronous)
                rec = _record(pairs[j][0], x.describe(), cfg, batch, t, stats, None, env.capture(x.device), session)
                rec["_samples"] = samples_of(t)
                records[j].append(rec)
    return {"results": [r for per_artifact in records for r in per_artifact]}


def samples_of(t) -> dict[str, list[float] | None]:
    """The raw per-iteration times of a :class:`~deploycomp.bench.timing.Timing`, in ms."""
    from deploycomp.bench.timing import ns_to_ms

    return {"latency_ms": ns_to_ms(t.latency_ns), "enqueue_ms": ns_to_ms(t.enqueue_ns), "device_ms": t.device_ms,
            "h2d_ms": ns_to_ms(t.h2d_ns) if t.h2d_ns else None, "d2h_ms": ns_to_ms(t.d2h_ns) if t.d2h_ns else None}


def _record(artifact, desc, cfg: BenchConfig, batch, timing, stats, mem, environment, session) -> dict[str, Any]:
    from deploycomp.bench.paired import drift_windows, relative_drift

    targets = timing.targets
    conditions = dict(timing.conditions)
    if timing.final_ns:  # the reference, timed again after the last round
        blocks = stats["block_medians_ms"]
        last = float(sorted(timing.final_ns)[len(timing.final_ns) // 2]) / 1e6
        start, end, k = drift_windows(blocks, last)
        conditions.update({"reference_first_block_ms": blocks[0], "reference_final_block_ms": last,
                           "reference_start_ms": start, "reference_end_ms": end, "drift_window_rounds": k,
                           "drift_pct": 100.0 * relative_drift(start, end)})
    return {
        "schema_version": SCHEMA_VERSION,
        "artifact": str(artifact),
        "label": desc.get("label") or Path(str(artifact)).stem,
        "arch": desc.get("arch"),
        "backend": desc["backend"],
        "provider": desc.get("provider"),
        "device": desc["device"],
        "batch": batch,
        "input_shape": desc.get("input_shape"),
        "precision": desc.get("precision"),
        "io": cfg.io,
        "threads": desc.get("threads"),
        "cuda_graph": bool(desc.get("cuda_graph", False)),
        "macs": desc.get("macs"),
        "params_total": desc.get("params_total"),
        "warmup_iterations": stats["warmup_iterations"],
        "warmup_s": stats["warmup_s"],
        "iterations": stats["iterations"],
        "rounds": stats["rounds"],
        "timed_wall_s": stats["timed_wall_s"],
        "targets": {"warmup_iterations": targets["warmup_iters"], "warmup_ms": targets["warmup_ms"],
                    "min_iterations": targets["min_iters"], "max_iterations": targets["max_iters"],
                    "duration_s": targets["duration_s"], "rounds": targets["rounds"], "budget_s": targets["budget_s"]},
        "latency_ms": stats["latency_ms"],
        "latency_median_ms": stats["latency_median_ms"],
        "latency_median_ci95_ms": stats["latency_median_ci95_ms"],
        "block_medians_ms": stats["block_medians_ms"],
        "enqueue_ms": stats["enqueue_ms"],
        "device_ms": stats["device_ms"],
        "h2d_ms": stats["h2d_ms"],
        "d2h_ms": stats["d2h_ms"],
        "throughput_ips": stats["throughput_ips"],
        "memory": mem,
        "session": session,
        "reference": None,
        "speedup": None,
        "speedup_ci95": None,
        "verdict": None,
        "paired": None,
        "macs_reduction": None,
        "speedup_efficiency": None,
        "conditions": conditions,
        "warnings": stats["warnings"],
        "environment": environment,
        "extra": {k: v for k, v in desc.items()
                  if k in ("execution_providers", "compile_mode", "tensorrt_version", "ort_spinning")},
    }


