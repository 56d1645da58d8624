"""Memory measurement, and the fresh process each memory-measured benchmark runs in.

Peaks are process-wide high-water marks (``ru_maxrss``, torch's peak allocator stats), so two
backends measured in one process would contaminate each other. With ``--memory`` every
(artifact, batch) therefore also runs in its own ``python -m deploycomp.bench.memory`` child (a short
run: :data:`MEMORY_RUN`), which reports its memory back through a JSON file; the latencies and
speed-ups still come from the interleaved rounds of the parent process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from deploycomp.errors import DeploycompError

MEMORY_RUN = {"rounds": 1, "iters": 20, "duration_s": None}  # timing options of a memory-only child run
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mib() -> float | None:
    """Current resident set size of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


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


def collect(runner, baseline_rss_mib: float | None) -> dict[str, Any]:
    """Every memory figure available for ``runner`` after its timed run (units: MiB)."""
    peak = peak_rss_mib()
    out: dict[str, Any] = {
        "host_peak_rss_mib": peak,
        "host_rss_before_load_mib": baseline_rss_mib,
        "host_peak_rss_delta_mib": peak - baseline_rss_mib if baseline_rss_mib is not None else None,
        "torch_peak_allocated_mib": None,
        "torch_peak_reserved_mib": None,
        "trt_engine_device_memory_mib": None,
        "trt_engine_file_mib": None,
        "trt_engine_weights_mib": None,
        "nvml_process_memory_mib": None,
    }
    out.update(runner.memory())
    if runner.device.startswith("cuda"):
        out["nvml_process_memory_mib"] = nvml_process_memory_mib(int(runner.device.split(":")[1]))
    return out


# --------------------------------------------------------------------------------------------------
# Fresh-process execution


def run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    """Run one benchmark job (see :func:`deploycomp.bench.run_job`) in a fresh Python process."""
    with tempfile.TemporaryDirectory(prefix="deploycomp-bench-") as tmp:
        job_path, out_path = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "deploycomp.bench.memory", str(job_path), str(out_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if out_path.exists():
            result = json.loads(out_path.read_text())
            if "error" in result:
                err = DeploycompError(result["error"])
                err.exit_code = result.get("exit_code", 1)
                raise err
            return result
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr else []
        what = job["artifacts"][0][0] if "artifacts" in job else job.get("artifact")
        raise DeploycompError(f"the benchmark process for {what} died (exit code {proc.returncode})"
                              f"{': ' + tail[0] if tail else ''}")


def _main(job_path: str, out_path: str) -> int:
    from deploycomp import console
    from deploycomp.bench import run_job
    from deploycomp.files import write_json

    console.set_verbosity(console.QUIET)
    job = json.loads(Path(job_path).read_text())
    try:
        result = run_job(job, measure_memory=True)
    except DeploycompError as e:
        write_json(out_path, {"error": str(e), "exit_code": e.exit_code})
        return 0
    write_json(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:3]))
