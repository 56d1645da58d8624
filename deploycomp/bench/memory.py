"""What a model costs in memory on its runtime, measured where nothing else moves the figure.

Every (artifact, batch) is measured in a fresh process of its own (:mod:`deploycomp.bench.worker`) that
imports only its backend's libraries: an ONNX Runtime or TensorRT process never imports torch (which
alone is hundreds of MiB of resident memory), a torch process imports torch. Inside it:

1. imports, then the *baseline*: the process's resident set size (``VmRSS`` from ``/proc/self/status``);
2. load (session or engine built, checkpoint rebuilt): ``load_peak_rss_mib`` is the peak RSS while loading
   minus the baseline (the peak is reset first through ``/proc/self/clear_refs``, so it is this step's own),
   ``loaded_rss_mib`` the RSS once loaded minus the baseline;
3. input created, warmup and timed runs: ``run_peak_rss_mib`` is the peak while running minus the baseline,
   ``steady_rss_mib`` the RSS after the runs minus the baseline: the weights as the runtime holds them
   (prepacked, in its arena), its activation buffers, the input and the output. This is the figure a
   deployer budgets for, and the one comparisons use.

What the runtimes report themselves is added where they report it: torch's parameters and buffers counted
exactly (``weights_mib``), the CUDA caching allocator's peaks (``torch_peak_allocated_mib`` /
``torch_peak_reserved_mib``), NVML's process memory, TensorRT's engine device memory
(``device_memory_size_v2``, else ``device_memory_size``) and file size. ONNX Runtime's Python API reports no
arena statistics, so its figures are the process's.

Each (artifact, batch) is measured ``MEMORY_REPEATS`` times, the artifacts in alternating order (A B | B A
| A B), and the median reported with the range; a reduction between two models is paired repeat by repeat.
On the CPU up to four of these processes run at once (:func:`memory_workers`): a process's resident
memory does not depend on its neighbours, and the default pipeline's 48 measurements take a third of the
time.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

MEMORY_RUN = {"rounds": 1, "iters": 20, "duration_s": None}  # timing options of a memory run
MEMORY_REPEATS = 3  # fresh processes per (artifact, batch)
FIGURES = ("load_peak_rss_mib", "loaded_rss_mib", "run_peak_rss_mib", "steady_rss_mib")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mib() -> float | None:
    """Current resident set size of this process (Linux /proc; None elsewhere)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def peak_rss_mib() -> float:
    """Peak resident set size of this process since start or since :func:`reset_peak` (MiB)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: ``5`` to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def nvml_process_memory_mib(device_index: int) -> float | None:
    """GPU memory NVML attributes to this process (None without nvidia-ml-py, a GPU, or a visible PID)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return proc.usedGpuMemory / 2**20
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Inside the fresh process


def measure_job(job: dict[str, Any]) -> dict[str, Any]:
    """Measure one artifact at one batch size (the job's first), following the steps in the module doc."""
    import gc

    from deploycomp.bench import BenchConfig
    from deploycomp.bench.backends import get_backend
    from deploycomp.bench.conditions import Conditions  # noqa: F401  imported by the harness: before the baseline
    from deploycomp.bench.timing import TimingConfig, measure_rounds

    (artifact, backend), = job["artifacts"]
    cfg = BenchConfig(**{**job["config"], "batches": tuple(job["config"]["batches"]), "pin_cores": None})
    batch = cfg.batches[0]
    runner_cls = get_backend(backend)
    runner_cls.preload()
    options = cfg.runner_options()
    runner = runner_cls(artifact, options)
    runner_cls.configure_process(options)
    gc.collect()
    base = rss_mib()
    resettable = reset_peak()
    runner.load_for_memory(job.get("prepared"))
    try:
        load_peak, loaded = peak_rss_mib(), rss_mib()
        reset_peak()
        runner.prepare(batch)
        measure_rounds([runner], TimingConfig(**MEMORY_RUN, warmup_iters=cfg.warmup, warmup_ms=cfg.warmup_ms),
                       final_reference=False)
        gc.collect()
        run_peak, steady = peak_rss_mib(), rss_mib()
        out: dict[str, Any] = {
            "baseline_rss_mib": base,
            "load_peak_rss_mib": load_peak - base if base is not None else None,
            "loaded_rss_mib": loaded - base if None not in (loaded, base) else None,
            "run_peak_rss_mib": run_peak - base if base is not None else None,
            "steady_rss_mib": steady - base if None not in (steady, base) else None,
            "peaks": "per step" if resettable else "since the process started (this kernel cannot reset them)",
            "torch_imported": "torch" in sys.modules,
            "weights_mib": None, "torch_peak_allocated_mib": None, "torch_peak_reserved_mib": None,
            "trt_engine_device_memory_mib": None, "trt_engine_file_mib": None, "trt_engine_weights_mib": None,
            "nvml_process_memory_mib": None,
        }
        out.update(runner.memory())
        if runner.device.startswith("cuda"):
            out["nvml_process_memory_mib"] = nvml_process_memory_mib(int(runner.device.split(":")[1]))
    finally:
        runner.deactivate()
    return {"memory": out}


# --------------------------------------------------------------------------------------------------
# In the parent


def memory_workers(pairs: list[tuple[str, str]], config) -> int:
    """How many memory processes run at once: one per core (at most 4) when every artifact runs on the CPU.

    A process's resident memory is its own, whatever runs beside it, so CPU measurements can overlap
    (the order of the repeats still alternates); GPU processes share one device's memory and run one
    at a time.
    """
    from deploycomp.bench.backends import get_backend

    if any(get_backend(b).resolve_device(config.runner_options()) != "cpu" for _, b in pairs):
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def measure(pairs: list[tuple[str, str]], config, repeats: int = MEMORY_REPEATS) -> dict[tuple, dict[str, Any]]:
    """Memory figures of every (artifact, backend, batch): median over ``repeats`` fresh processes, with ranges.

    Repeat ``i`` measures the artifacts in the given order when ``i`` is even and in reverse when odd, so
    that no model always comes first (a page cache or a CPU frequency warmed by the previous process).
    The repeats of every model are kept (``repeats``) for :func:`reductions`.
    """
    import dataclasses
    import statistics
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from deploycomp import console
    from deploycomp.bench.backends import get_backend
    from deploycomp.bench.worker import run_isolated

    base_cfg = {**dataclasses.asdict(config), "memory": False, "pin_cores": None}
    base_cfg["input_size"] = list(config.input_size) if config.input_size else None
    runs: dict[tuple, list[dict]] = {}
    jobs = [(a, b, batch) for a, b in pairs for batch in config.batches]
    with tempfile.TemporaryDirectory(prefix="deploycomp-memory-") as tmp, \
            console.status_line(f"memory: {len(jobs)} measurement{'s' if len(jobs) > 1 else ''} x {repeats}, "
                                "each in a fresh process") as show:
        prepared = {(a, b): get_backend(b).memory_artifact(str(a), config.runner_options(), Path(tmp))
                    for a, b in pairs}
        order = [(i, job) for i in range(repeats) for job in (jobs if i % 2 == 0 else jobs[::-1])]
        work = [{"kind": "memory", "artifacts": [[str(a), b]], "config": {**base_cfg, "batches": [batch]},
                 "prepared": prepared[(a, b)]} for _, (a, b, batch) in order]
        with ThreadPoolExecutor(max_workers=memory_workers(pairs, config)) as pool:
            results = pool.map(run_isolated, work)
            for k, ((i, (artifact, backend, batch)), result) in enumerate(zip(order, results, strict=True)):
                show(f"repeat {i + 1}/{repeats}, {k % len(jobs) + 1}/{len(jobs)}")
                runs.setdefault((str(artifact), backend, batch), []).append(result["memory"])
    out = {}
    for key, reps in runs.items():
        fig = dict(reps[0])
        for name in FIGURES:
            values = [r[name] for r in reps if r.get(name) is not None]
            fig[name] = statistics.median(values) if values else None
            fig[f"{name.removesuffix('_rss_mib')}_range_mib"] = [min(values), max(values)] if values else None
        fig["repeats"] = [{k: r.get(k) for k in FIGURES} for r in reps]
        out[key] = fig
    return out


def reduction(reference: dict, mem: dict) -> tuple[float | None, list[float] | None]:
    """Steady-state reduction of ``mem`` against ``reference`` (memory figures): the percentage from the
    medians, and the range of the per-repeat reductions (repeat i of one against repeat i of the other)."""
    if not mem.get("steady_rss_mib") or not reference.get("steady_rss_mib"):
        return None, None
    pct = 100.0 * (1.0 - mem["steady_rss_mib"] / reference["steady_rss_mib"])
    pairs = zip(reference.get("repeats") or [], mem.get("repeats") or [], strict=False)
    per = [100.0 * (1.0 - b["steady_rss_mib"] / a["steady_rss_mib"]) for a, b in pairs
           if a.get("steady_rss_mib") and b.get("steady_rss_mib")]
    return pct, ([min(per), max(per)] if per else None)


def reductions(results: list[dict]) -> None:
    """``memory_reduction_pct`` / ``memory_reduction_range_pct`` of each result against its reference (the first
    result on the same backend, device and batch, as for speed-ups), in place."""
    refs: dict[tuple, dict] = {}
    for r in results:
        ref = refs.setdefault((r["batch"], r["backend"], r.get("device")), r)
        mem = r.get("memory")
        if ref is r or not mem:
            continue
        mem["memory_reduction_pct"], mem["memory_reduction_range_pct"] = reduction(ref.get("memory") or {}, mem)
