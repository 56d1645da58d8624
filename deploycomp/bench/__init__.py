"""Benchmarking: real latency, throughput and memory of checkpoints, ONNX files and TensorRT engines.

Library entry point::

    from deploycomp.bench import BenchConfig, benchmark
    results = benchmark(["base.pt", "pruned.pt"], BenchConfig(batches=(1, 8), rounds=20))
    results[1]["speedup"], results[1]["speedup_ci95"], results[1]["verdict"]  # 1.8, [1.7, 1.9], "faster"

All artifacts are loaded together and timed in interleaved rounds
(:func:`deploycomp.bench.timing.measure_rounds`), so that every speed-up is paired and comes with a
95 % interval and a verdict (:mod:`deploycomp.bench.paired`). That is one *session*; a run has several
(``sessions``, 5 by default), each in a fresh process, and its intervals are across sessions, so that
they hold for a re-run (:mod:`deploycomp.bench.sessions`). Each result is a flat-ish dict following
the schema in ``docs/bench-schema.md`` (``SCHEMA_VERSION``); :func:`write_json` / :func:`write_csv`
store a list of them. Backends live in :mod:`deploycomp.bench.backends`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploycomp import console
from deploycomp.errors import UsageError, check

SCHEMA = "deploycomp.bench"
SCHEMA_VERSION = 3  # 2: paired rounds (speedup_ci95, verdict, rounds, block medians, conditions); 3: sessions
IO_MODES = ("device", "host")


@dataclass
class BenchConfig:
    """Options of one ``benchmark`` call. ``None`` means the default of the backend or harness."""

    backend: str = "auto"  # auto, torch, torch-compile, ort, trt (auto: by file type)
    device: str | None = None  # cpu, cuda, cuda:N (None: CUDA when present, else CPU; engines: CUDA)
    provider: str | None = None  # ONNX Runtime EP: cpu, cuda, tensorrt (None: follows the device)
    batches: tuple[int, ...] = (1,)
    warmup: int | None = None  # warmup iterations (default 5)
    warmup_ms: float | None = None  # minimum warmup time (default 200 ms)
    iters: int | None = None  # timed iterations per artifact (see TimingConfig: how they combine with duration_s)
    duration_s: float | None = None  # minimum timed duration per artifact
    rounds: int | None = None  # interleaved rounds per session (default 10): each times one block of every artifact
    sessions: int | None = None  # sessions, each a fresh process loading every artifact anew (default 5)
    budget_s: float | None = None  # no new round once the timed rounds took this long (per batch size)
    margin_pct: float | None = None  # speed-ups within this of 1 are "same" (default 2 %)
    pin_cores: tuple[int, ...] | None = None  # run on these CPUs only (Linux affinity)
    arch: str | None = None  # torch backends: architecture / user code entry point of a checkpoint that needs it
    threads: int | None = None  # intra-op threads of torch / ONNX Runtime (None: library default)
    io: str = "device"  # device: inputs already on the device; host: also time H2D/D2H copies separately
    cuda_graph: bool = False  # torch on CUDA: replay a captured CUDA graph
    memory: bool = False  # measure memory; runs every (artifact, batch) in a fresh process
    input_size: tuple[int, int] | None = None  # (H, W) for zoo models / checkpoints (default: their own)
    seed: int = 0  # input data seed

    def validate(self) -> BenchConfig:
        from deploycomp.bench.backends import BACKENDS

        if self.backend != "auto":
            BACKENDS.get(self.backend)  # unknown name -> one-line error listing the valid ones
        check(len(self.batches) > 0, "--batch needs at least one batch size")
        for b in self.batches:
            check(isinstance(b, int) and b > 0, f"--batch sizes must be positive integers, got {b!r}")
        check(self.threads is None or self.threads > 0, f"--threads must be positive, got {self.threads}")
        check(self.io in IO_MODES, f"--io must be one of {', '.join(IO_MODES)}, got {self.io!r}")
        _check_sessions(self.sessions)
        check(self.margin_pct is None or 0 <= self.margin_pct < 100,
              f"--margin-pct must be in [0, 100), got {self.margin_pct}")
        self.timing().validate()
        return self

    def timing(self):
        from deploycomp.bench.timing import TimingConfig

        return TimingConfig(self.warmup, self.warmup_ms, self.iters, self.duration_s, self.rounds, self.budget_s)

    def session_count(self) -> int:
        from deploycomp.bench.sessions import DEFAULT_SESSIONS

        return DEFAULT_SESSIONS if self.sessions is None else self.sessions

    def margin(self) -> float:
        from deploycomp.bench.paired import DEFAULT_MARGIN_PCT

        return DEFAULT_MARGIN_PCT if self.margin_pct is None else self.margin_pct

    def runner_options(self):
        from deploycomp.bench.backends import RunnerOptions

        return RunnerOptions(self.device, self.provider, self.threads, self.cuda_graph,
                             tuple(self.input_size) if self.input_size else None, self.seed, self.arch)


def _check_sessions(sessions) -> None:
    from deploycomp.bench.sessions import DEFAULT_SESSIONS, MAX_SESSIONS

    ok = sessions is None or (isinstance(sessions, int) and not isinstance(sessions, bool)
                              and 1 <= sessions <= MAX_SESSIONS)
    check(ok, f"--sessions must be a whole number from 1 to {MAX_SESSIONS}, got {sessions!r} ({DEFAULT_SESSIONS} is "
              "the default; 1 times everything in one session, whose interval a re-run need not repeat)")


def plan(artifacts: Sequence[str], backend: str = "auto") -> list[tuple[str, str]]:
    """(artifact, backend name) pairs; refuses a backend that cannot read an artifact."""
    from deploycomp.bench.backends import backend_for, get_backend

    pairs = []
    for art in artifacts:
        natural = backend_for(art)
        name = natural if backend == "auto" else backend
        if get_backend(name).family != get_backend(natural).family:
            raise UsageError(f"the {name} backend cannot run {art} ({get_backend(natural).kind}); "
                             f"use --backend {natural} or --backend auto")
        pairs.append((art, name))
    return pairs


def benchmark(artifacts: str | Sequence[str] | None = None, config: BenchConfig | None = None,
              names: Sequence[str] | None = None) -> list[dict]:
    """Benchmark the artifacts together at each batch size; results in the order given, compared to the first.

    ``artifacts``: checkpoint paths, zoo names, ``.onnx`` files or TensorRT engines (``None``: the
    shipped baseline). In each session (a fresh process; ``--sessions 1``: this process) all are loaded
    at once and timed in interleaved rounds; the speed-up of each against the first on the same backend
    and batch is paired round by round and combined across sessions. With ``config.memory`` each
    (artifact, batch) is also measured in processes of its own (:mod:`deploycomp.bench.memory`).
    ``names`` (one per artifact, e.g. the pipeline's variant names) say in warnings which model is meant.
    """
    from deploycomp.bench.sessions import run_sessions
    from deploycomp.checkpoint import default_model

    config = (config or BenchConfig()).validate()
    if artifacts is None or (not isinstance(artifacts, str) and len(artifacts) == 0):
        artifacts = [default_model()]
    elif isinstance(artifacts, str):
        artifacts = [artifacts]
    pairs = plan(list(artifacts), config.backend)
    job = {"artifacts": [list(p) for p in pairs], "config": _config_dict(config)}
    n = config.session_count()
    if n == 1:  # in this process, whose own status line shows the rounds
        results = run_sessions(job, 1)
    else:
        what = Path(pairs[0][0]).stem if len(pairs) == 1 else f"{len(pairs)} models"
        with console.status_line(f"timing {what} in {n} sessions, each a fresh process") as show:
            results = run_sessions(job, n, progress=lambda i, k: show(f"session {i}/{k}"))
    if config.memory:
        _attach_memory(results, pairs, config)
    if names is not None:
        by_artifact = dict(zip((str(a) for a, _ in pairs), names, strict=True))
        for r in results:
            r["name"] = by_artifact[str(r["artifact"])]
    compare(results, margin_pct=config.margin())
    if config.memory:
        from deploycomp.bench.memory import reductions

        reductions(results)
    warn_summary(results)
    return results


def warn_summary(results: list[dict]) -> None:
    """Each warning once, naming every model (variant, precision, backend, batch) it applies to."""
    seen: dict[str, list[str]] = {}
    for r in results:
        for w in r.get("warnings") or []:
            seen.setdefault(_warning_kind(w), []).append(f"{_who(r)}: {w}")
    for texts in seen.values():
        if len(texts) == 1:
            console.warn(texts[0])
        else:
            console.warn(f"{len(texts)} results: {texts[0]} (and {len(texts) - 1} more like it; every warning is "
                         "in the JSON under 'warnings')")


def _who(r: dict) -> str:
    """``magnitude-30 int8, ort, batch 8``: which result a warning is about."""
    name = r.get("name") or r["label"]
    precision = r.get("precision")
    return f"{name}{' ' + precision if precision else ''}, {r['backend']}, batch {r['batch']}"


def _warning_kind(text: str) -> str:
    """A warning without its numbers, so that repeats of one kind collapse into one line."""
    import re

    return re.sub(r"[-+]?\d[\d.,]*", "#", text.split(":")[0])


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["batches"] = list(config.batches)
    d["input_size"] = list(config.input_size) if config.input_size else None
    d["pin_cores"] = list(config.pin_cores) if config.pin_cores else None
    return d


def _attach_memory(results: list[dict], pairs: list[tuple[str, str]], config: BenchConfig) -> None:
    """Memory of each (artifact, batch), in fresh processes of its own (:func:`deploycomp.bench.memory.measure`)."""
    from deploycomp.bench.memory import measure

    figures = measure(pairs, config)
    for r in results:
        r["memory"] = figures.get((str(r["artifact"]), r["backend"], r["batch"]))


def compare(results: list[dict], margin_pct: float | None = None) -> list[dict]:
    """Fill the speed-up against the reference at the same batch size, with its interval and verdict, in place.

    The reference of a result is the first artifact timed on the same backend and device at the same
    batch (normally the first artifact): a speed-up across backends would mix the backend's speed into
    the model's. When both were timed in the same run (``session``: the run's id), the speed-up is paired
    (:func:`deploycomp.bench.paired.paired_between`: per session the geometric mean of per-round ratios of
    block medians; over sessions their geometric mean with the 95 % t interval across sessions; a verdict);
    otherwise it is the ratio of the medians, with no interval and no verdict (``paired`` false).
    macs_reduction = reference MACs / this MACs; speedup_efficiency = speedup / macs_reduction (1.0: latency
    fell as much as MACs).
    """
    from deploycomp.bench.conditions import conditions_warning
    from deploycomp.bench.paired import DEFAULT_MARGIN_PCT, paired_between

    margin = DEFAULT_MARGIN_PCT if margin_pct is None else margin_pct
    refs: dict[tuple, dict] = {}
    for r in results:
        ref = refs.setdefault((r["batch"], r["backend"], r.get("device")), r)  # repeated artifacts: first wins
        r["reference"] = ref["label"]
        est = None if r is ref else paired_between(ref, r, margin)
        if r is ref:
            r.update({"speedup": 1.0, "speedup_ci95": None, "verdict": None, "paired": None})
        elif est is not None:
            r.update({"speedup": est.speedup, "speedup_ci95": list(est.ci95) if est.ci95 else None,
                      "verdict": est.verdict, "paired": True})
            _session_speedups(ref, r, margin)
            if est.ci95 is None:
                _warn_once(r, f"only {est.rounds} rounds in one session: too few for an interval and a verdict; "
                              "use --sessions 2 or more (5 is the default) or --rounds 5 or more")
        else:
            r.update({"speedup": ref["latency_ms"]["median"] / r["latency_ms"]["median"], "speedup_ci95": None,
                      "verdict": None, "paired": False})
        if ref.get("macs") and r.get("macs"):
            r["macs_reduction"] = ref["macs"] / r["macs"]
            r["speedup_efficiency"] = r["speedup"] / r["macs_reduction"]
    _flag_slow_int8(results, margin)
    sessions: set = set()
    for r in results:
        _check_drift(r)
        if r.get("session") in sessions:
            continue  # the machine's state is one fact per session: said on its first result
        sessions.add(r.get("session"))
        w = conditions_warning(r.get("conditions") or {})
        if w:
            _warn_once(r, w)
    return results


def _session_speedups(ref: dict, r: dict, margin: float) -> None:
    """Each session's own paired speed-up, in the session's entry (how far sessions land from each other)."""
    from deploycomp.bench.paired import paired_speedup

    for a, b in zip(ref.get("sessions") or [], r.get("sessions") or [], strict=False):
        if len(a["block_medians_ms"]) == len(b["block_medians_ms"]) > 0:
            est = paired_speedup(a["block_medians_ms"], b["block_medians_ms"], margin_pct=margin)
            b.update({"speedup": est.speedup, "speedup_ci95": list(est.ci95) if est.ci95 else None})


def _flag_slow_int8(results: list[dict], margin_pct: float) -> None:
    """An INT8 ONNX model timed slower than its FP32 original in the same session gets a warning saying why.

    The original is found through the quantized model's sidecar (:func:`deploycomp.quantize.fp32_source`,
    which checks its SHA-256), the comparison is paired like every other, and the reason comes from the
    target the model was quantized for (:func:`deploycomp.quantize.target_hint`).
    """
    from deploycomp.bench.paired import fmt_speedup, paired_between

    int8 = [r for r in results if r.get("precision") == "int8" and str(r["artifact"]).endswith(".onnx")]
    if not int8:
        return
    from deploycomp.export import read_sidecar
    from deploycomp.quantize import fp32_source, target_hint

    for r in int8:
        source = fp32_source(r["artifact"])
        original = next((o for o in results if source is not None and o is not r
                         and o.get("session") == r.get("session") and o["batch"] == r["batch"]
                         and Path(o["artifact"]).resolve() == source), None)
        est = paired_between(original, r, margin_pct) if original is not None else None
        if est is not None and est.verdict == "slower":
            hint = target_hint(read_sidecar(r["artifact"]), r["backend"], r.get("device"))
            _warn_once(r, f"INT8 is slower than its FP32 original {original['label']} on {r['backend']} "
                          f"({fmt_speedup(est.speedup, est.ci95)}x): {hint}")


def _warn_once(r: dict, text: str) -> None:
    r.setdefault("warnings", [])
    if text not in r["warnings"]:
        r["warnings"].append(text)


def _check_drift(r: dict) -> None:
    """The reference's latency at the end of the session far from the one at its start: the machine drifted."""
    from deploycomp.bench.paired import DRIFT_WARN_PCT

    cond = r.get("conditions") or {}
    if cond.get("reference_end_ms") is None or abs(cond["drift_pct"]) <= DRIFT_WARN_PCT:
        return
    k = cond["drift_window_rounds"]
    _warn_once(r, f"the machine's speed changed during the comparison: {r['label']} took "
                  f"{cond['reference_start_ms']:.3g} ms in the first {k} rounds and {cond['reference_end_ms']:.3g} ms "
                  f"at the end ({cond['drift_pct']:+.0f}%); the paired speed-ups allow for it, the absolute "
                  "latencies do not: close other work or use --pin-cores")


# --------------------------------------------------------------------------------------------------
# Output: JSON, CSV, table

CSV_COLUMNS = (
    "schema_version", "label", "artifact", "arch", "backend", "provider", "device", "device_name", "batch",
    "input_shape", "precision", "io", "threads", "cuda_graph", "macs", "params_total",
    "warmup_iterations", "iterations", "timed_wall_s",
    *(f"latency_ms_{k}" for k in ("min", "mean", "median", "p90", "p95", "p99", "max", "std", "cov_pct")),
    "enqueue_ms_median", "device_ms_median", "h2d_ms_median", "d2h_ms_median", "throughput_ips",
    "reference", "speedup", "macs_reduction", "speedup_efficiency",
    "host_peak_rss_mib", "host_peak_rss_delta_mib", "torch_peak_allocated_mib", "torch_peak_reserved_mib",
    "trt_engine_device_memory_mib", "nvml_process_memory_mib",
    "cpu_model", "torch", "onnxruntime", "tensorrt", "cuda_runtime", "cudnn", "driver", "torch_cuda_build", "time_utc",
    "warnings",
    # schema 2: paired rounds
    "rounds", "latency_median_ci95_low_ms", "latency_median_ci95_high_ms", "speedup_ci95_low", "speedup_ci95_high",
    "verdict", "paired", "session", "load_avg_1m_before", "load_avg_1m_after", "other_cpu_pct", "drift_pct",
    "pinned_cpus", "latency_median_ms",
    # schema 3: sessions and memory figures of a process of its own
    "sessions", "interval", "steady_rss_mib", "load_peak_rss_mib", "run_peak_rss_mib", "weights_mib",
)


def median_ms(r: dict) -> float:
    """The median latency a result reports with its interval (records older than that field: the pooled one)."""
    return r.get("latency_median_ms") or r["latency_ms"]["median"]


def csv_row(r: dict) -> dict[str, Any]:
    env, mem = r.get("environment") or {}, r.get("memory") or {}
    row: dict[str, Any] = {k: r.get(k) for k in CSV_COLUMNS if k in r}
    row["input_shape"] = "x".join(map(str, r["input_shape"])) if r.get("input_shape") else None
    for k, v in r["latency_ms"].items():
        row[f"latency_ms_{k}"] = v
    for group in ("enqueue_ms", "device_ms", "h2d_ms", "d2h_ms"):
        row[f"{group}_median"] = r[group]["median"] if r.get(group) else None
    for k in CSV_COLUMNS:
        if k in mem:
            row[k] = mem[k]
        elif k in env and k not in row:
            row[k] = env[k]
    row["warnings"] = " | ".join(r.get("warnings", []))
    row["sessions"] = len(r["sessions"]) if isinstance(r.get("sessions"), list) else r.get("sessions")
    for key, pair in (("latency_median_ci95_{}_ms", r.get("latency_median_ci95_ms")),
                      ("speedup_ci95_{}", r.get("speedup_ci95"))):
        row[key.format("low")], row[key.format("high")] = pair if pair else (None, None)
    cond = r.get("conditions") or {}
    for k in ("load_avg_1m_before", "load_avg_1m_after", "other_cpu_pct", "drift_pct"):
        row[k] = cond.get(k)
    row["pinned_cpus"] = ",".join(map(str, cond["pinned_cpus"])) if cond.get("pinned_cpus") else None
    return {k: row.get(k) for k in CSV_COLUMNS}


def write_json(path: str, results: list[dict]) -> str:
    """``{"schema", "schema_version", "results": [...]}``; ``-`` prints to stdout."""
    import json

    from deploycomp.files import _json_default
    from deploycomp.files import write_json as atomic_write_json

    doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "results": results}
    if path == "-":
        console.result(json.dumps(doc, indent=2, default=_json_default))
    else:
        atomic_write_json(path, doc)
    return path


def write_csv(path: str, results: list[dict]) -> str:
    """One row per result with the fixed columns ``CSV_COLUMNS``; ``-`` prints to stdout."""
    from deploycomp.files import atomic_path

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow(csv_row(r))
    if path == "-":
        console.result(buf.getvalue().rstrip("\n"))
    else:
        with atomic_path(path) as tmp:
            tmp.write_text(buf.getvalue())
    return path


def read_results(path: str) -> list[dict]:
    """Results from a ``--json`` file, refusing an unknown schema or a newer schema version."""
    from deploycomp.errors import InputFileError
    from deploycomp.files import read_json

    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise InputFileError(f"{path} is not a deploycomp bench result file (schema {SCHEMA!r})")
    if doc.get("schema_version", 0) > SCHEMA_VERSION:
        raise InputFileError(f"{path} has bench schema version {doc['schema_version']}, newer than this "
                             f"deploycomp reads ({SCHEMA_VERSION}); upgrade deploycomp")
    return doc["results"]


def tables(results: list[dict], with_memory: bool = False) -> list[tuple[str, list[str], list[list], list[str]]]:
    """(title, columns, rows, optional columns) of the terminal tables: latency; comparison; memory.

    No cell is wrapped: the optional columns are left out, in order, until a table fits the terminal
    (``deploycomp.console.table``). Each title says what its intervals cover (across sessions, or within
    one session).
    """
    from deploycomp.bench.paired import fmt_interval, fmt_speedup

    def name(r):
        return r["label"], r["backend"] + (f"/{r['provider']}" if r.get("provider") else ""), r["batch"]

    covers = results[0].get("interval") or "over rounds" if results else ""
    out = [(f"latency in ms (run + sync, inputs on the device); median with its 95% interval {covers}",
            ["model", "backend", "batch", "median [95% interval]", "p99", "rounds", "img/s"],
            [[*name(r), fmt_interval(median_ms(r), r.get("latency_median_ci95_ms")),
              r["latency_ms"]["p99"], r.get("rounds"), r["throughput_ips"]] for r in results],
            ["rounds", "p99", "img/s", "backend"])]
    if len({r["artifact"] for r in results}) > 1:
        runs = " and runs minutes apart" if "sessions" in covers and "across" in covers else ""
        out.append(("compared with the first model on the same backend and batch, timed in alternation: "
                    f"speed-up [95% interval {covers}{runs}] and verdict; efficiency = speed-up / MACs reduction",
                    ["model", "backend", "batch", "MACs red.", "speed-up [95% interval]", "verdict", "efficiency"],
                    [[*name(r), r["macs_reduction"], fmt_speedup(r["speedup"], r.get("speedup_ci95")),
                      r.get("verdict") or ("reference" if r.get("paired") is None else "-"),
                      r["speedup_efficiency"]] for r in results],
                    ["efficiency", "MACs red.", "backend"]))
    if with_memory:
        out.append(memory_table(results, name))
    return out


def memory_table(results: list[dict], name) -> tuple[str, list[str], list[list], list[str]]:
    """The memory table: what each model costs on its runtime, in a fresh process of its own."""
    from deploycomp.bench.memory import MEMORY_REPEATS

    def cell(mem: dict, key: str):
        return mem.get(key)

    def reduction(mem: dict) -> str:
        pct, rng = mem.get("memory_reduction_pct"), mem.get("memory_reduction_range_pct")
        if pct is None:
            return "reference" if mem.get("steady_rss_mib") is not None else "-"
        return f"{pct:.1f}%" + (f" [{rng[0]:.1f}, {rng[1]:.1f}]" if rng else "")

    title = ("memory in MiB above the process's baseline (after imports), each model in a fresh process of its own "
             f"(median of {MEMORY_REPEATS}): load peak = peak while loading; steady = resident after warmup and "
             "the timed runs (weights as the runtime holds them, activations, input and output); weights = "
             "parameters + buffers (torch); reduction = steady state against the first model [range over repeats]")
    rows = [[*name(r), *(cell(r.get("memory") or {}, k) for k in ("load_peak_rss_mib", "steady_rss_mib",
                                                                    "weights_mib")),
             reduction(r.get("memory") or {})] for r in results]
    return (title, ["model", "backend", "batch", "load peak", "steady", "weights", "reduction"], rows,
            ["weights", "load peak", "backend"])


def describe_environment(results: list[dict]) -> str:
    """One line with what the results ran on (from the first result)."""
    if not results:
        return ""
    r = results[0]
    e = r["environment"]
    parts = [f"device: {e.get('device_name')}", f"CPU: {e.get('cpu_model')} ({e.get('cpus_usable')} usable)",
             f"threads: {r.get('threads')}", f"torch {e.get('torch')}"]
    parts += [f"{k} {e[k]}" for k in ("onnxruntime", "tensorrt", "cuda_runtime", "cudnn", "driver") if e.get(k)]
    its = sorted(x["iterations"] for x in results)
    timed = f"{its[0]}" if its[0] == its[-1] else f"{its[0]}-{its[-1]}"
    rounds = r.get("rounds") or 1
    n = len(r["sessions"]) if isinstance(r.get("sessions"), list) else 1
    per = f" in each of {n} sessions (fresh processes)" if n > 1 else ""
    parts.append(f"warmup >= {r['targets']['warmup_iterations']} iterations and {r['targets']['warmup_ms']:.0f} ms"
                 f"{per}; {timed} timed iterations in {rounds} round{'s' if rounds > 1 else ''}"
                 f"{' in all' if n > 1 else ''}")
    cond = r.get("conditions") or {}
    if cond.get("load_avg_1m_before") is not None:
        parts.append(f"load average {cond['load_avg_1m_before']} before, {cond.get('load_avg_1m_after')} after")
    if cond.get("other_cpu_pct") is not None:
        parts.append(f"other processes used {cond['other_cpu_pct']:.0f}% of the CPUs while timing")
    if cond.get("pinned_cpus"):
        parts.append(f"pinned to CPUs {','.join(map(str, cond['pinned_cpus']))}")
    return "; ".join(parts)
