"""Benchmarking: real latency, throughput and memory of checkpoints, ONNX files and TensorRT engines.

Library entry point::

    from deploycomp.bench import BenchConfig, benchmark
    results = benchmark(["base.pt", "pruned.pt"], BenchConfig(batches=(1, 8), iters=200))

Each result is a flat-ish dict following the schema in ``docs/bench-schema.md`` (``SCHEMA_VERSION``);
:func:`write_json` / :func:`write_csv` store a list of them. All timing goes through
:mod:`deploycomp.bench.timing`; backends live in :mod:`deploycomp.bench.backends`.
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
SCHEMA_VERSION = 1
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
    iters: int | None = None  # timed iterations (see TimingConfig for how they combine with duration_s)
    duration_s: float | None = None  # minimum timed duration
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
        self.timing().validate()
        return self

    def timing(self):
        from deploycomp.bench.timing import TimingConfig

        return TimingConfig(self.warmup, self.warmup_ms, self.iters, self.duration_s)

    def runner_options(self):
        from deploycomp.bench.backends import RunnerOptions

        return RunnerOptions(self.device, self.provider, self.threads, self.cuda_graph,
                             tuple(self.input_size) if self.input_size else None, self.seed)


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


def benchmark(artifacts: str | Sequence[str] | None = None, config: BenchConfig | None = None) -> list[dict]:
    """Benchmark each artifact at each batch size; results in the order given, compared to the first.

    ``artifacts``: checkpoint paths, zoo names, ``.onnx`` files or TensorRT engines (``None``: the
    shipped baseline). With ``config.memory`` each (artifact, batch) runs in a fresh process.
    """
    from deploycomp.bench.memory import run_isolated
    from deploycomp.checkpoint import default_model

    config = (config or BenchConfig()).validate()
    if artifacts is None or (not isinstance(artifacts, str) and len(artifacts) == 0):
        artifacts = [default_model()]
    elif isinstance(artifacts, str):
        artifacts = [artifacts]
    results: list[dict] = []
    for artifact, backend in plan(list(artifacts), config.backend):
        job = {"artifact": str(artifact), "backend": backend, "config": _config_dict(config)}
        if config.memory:
            for batch in config.batches:
                results += run_isolated({**job, "config": {**job["config"], "batches": [batch]}})["results"]
        else:
            results += run_job(job)["results"]
    compare(results)
    for r in results:
        for w in r["warnings"]:
            console.warn(f"{r['label']} ({r['backend']}, batch {r['batch']}): {w}")
    return results


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["batches"] = list(config.batches)
    d["input_size"] = list(config.input_size) if config.input_size else None
    return d


def run_job(job: dict[str, Any], measure_memory: bool = False) -> dict[str, Any]:
    """Benchmark one artifact with one backend at each of the job's batch sizes (in this process)."""
    from deploycomp.bench import env, memory
    from deploycomp.bench.backends import get_backend
    from deploycomp.bench.timing import measure, statistics

    cfg = BenchConfig(**{**job["config"], "batches": tuple(job["config"]["batches"])})
    cls = get_backend(job["backend"])
    cls.preload()
    baseline = memory.rss_mib() if measure_memory else None
    timing_cfg = cfg.timing()
    records = []
    with cls(job["artifact"], cfg.runner_options()) as runner:
        for batch in cfg.batches:
            desc = runner.describe()
            with console.status_line(f"benchmarking {desc.get('label')} ({runner.name}, {runner.device}, "
                                     f"batch {batch})"):
                runner.prepare(batch)
                t = measure(runner, timing_cfg, io=cfg.io)
            stats = statistics(t, batch, asynchronous=runner.asynchronous)
            mem = memory.collect(runner, baseline) if measure_memory else None
            records.append(_record(job["artifact"], runner.describe(), cfg, batch, t.targets, stats, mem,
                                   env.capture(runner.device)))
    return {"results": records}


def _record(artifact, desc, cfg: BenchConfig, batch, targets, stats, mem, environment) -> dict[str, Any]:
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
        "timed_wall_s": stats["timed_wall_s"],
        "targets": {"warmup_iterations": targets["warmup_iters"], "warmup_ms": targets["warmup_ms"],
                    "min_iterations": targets["min_iters"], "max_iterations": targets["max_iters"],
                    "duration_s": targets["duration_s"]},
        "latency_ms": stats["latency_ms"],
        "enqueue_ms": stats["enqueue_ms"],
        "device_ms": stats["device_ms"],
        "h2d_ms": stats["h2d_ms"],
        "d2h_ms": stats["d2h_ms"],
        "throughput_ips": stats["throughput_ips"],
        "memory": mem,
        "reference": None,
        "speedup": None,
        "macs_reduction": None,
        "speedup_efficiency": None,
        "warnings": stats["warnings"],
        "environment": environment,
        "extra": {k: v for k, v in desc.items() if k in ("execution_providers", "compile_mode", "tensorrt_version")},
    }


def compare(results: list[dict]) -> list[dict]:
    """Fill speed-up (median latency) against the reference at the same batch size, in place.

    The reference of a result is the first artifact timed on the same backend and device at the same
    batch (normally the first artifact): a speed-up across backends would mix the backend's speed into
    the model's. speedup = reference median latency / this median latency; macs_reduction = reference
    MACs / this MACs; speedup_efficiency = speedup / macs_reduction (1.0: latency fell as much as MACs).
    """
    refs: dict[tuple, dict] = {}
    for r in results:
        ref = refs.setdefault((r["batch"], r["backend"], r.get("device")), r)  # repeated artifacts: first wins
        r["reference"] = ref["label"]
        r["speedup"] = ref["latency_ms"]["median"] / r["latency_ms"]["median"]
        if ref.get("macs") and r.get("macs"):
            r["macs_reduction"] = ref["macs"] / r["macs"]
            r["speedup_efficiency"] = r["speedup"] / r["macs_reduction"]
    return results


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
)


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


def tables(results: list[dict], with_memory: bool = False) -> list[tuple[str, list[str], list[list]]]:
    """(title, columns, rows) of the terminal tables: latency; comparison (several artifacts); memory.

    Kept narrow (seven columns each) so they stay readable in an 80-column terminal or a CI log.
    """
    def name(r):
        return r["label"], r["backend"] + (f"/{r['provider']}" if r.get("provider") else ""), r["batch"]

    out = [("latency in ms (run + sync, inputs on the device)",
            ["model", "backend", "batch", "median", "p99", "CoV %", "img/s"],
            [[*name(r), r["latency_ms"]["median"], r["latency_ms"]["p99"], round(r["latency_ms"]["cov_pct"], 2),
              r["throughput_ips"]] for r in results])]
    if len({r["artifact"] for r in results}) > 1:
        out.append(("compared with the first model timed on the same backend and batch (speed-up of the median "
                    "latency; efficiency = speed-up / MACs reduction)",
                    ["model", "backend", "batch", "GMACs", "MACs red.", "speed-up", "efficiency"],
                    [[*name(r), r["macs"] / 1e9 if r.get("macs") else None, r["macs_reduction"], r["speedup"],
                      r["speedup_efficiency"]] for r in results]))
    if with_memory:
        keys = ("host_peak_rss_mib", "host_peak_rss_delta_mib", "torch_peak_reserved_mib",
                "trt_engine_device_memory_mib")
        out.append(("memory in MiB (each run in a fresh process)",
                    ["model", "backend", "batch", "peak RSS", "RSS added", "torch reserved", "TRT engine"],
                    [[*name(r), *((r.get("memory") or {}).get(k) for k in keys)] for r in results]))
    return out


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
    parts.append(f"warmup >= {r['targets']['warmup_iterations']} iterations and {r['targets']['warmup_ms']:.0f} ms; "
                 f"{timed} timed iterations")
    return "; ".join(parts)
