"""The environment a benchmark ran in: machine, device, library versions. Recorded with every result.

Nothing here imports an optional library that is not installed: versions come from package metadata
where possible, the NVIDIA driver from /proc (or NVML when nvidia-ml-py is present).
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
from importlib import metadata
from typing import Any


def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    parts = first.split()
    return next((p for p in parts if p[:1].isdigit() and "." in p), first.strip() or None)


def _torch():
    """torch when this process has imported it, else None (a benchmark process of ONNX Runtime stays torch-free)."""
    import sys

    return sys.modules.get("torch")


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    from deploycomp import __version__

    torch = _torch()

    return {
        "deploycomp": __version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),
        "torch": torch.__version__ if torch else _version("torch"),
        "torchvision": _version("torchvision"),
        "onnxruntime": _version("onnxruntime-gpu", "onnxruntime"),
        "tensorrt": _version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
        # the CUDA torch was built against (None for CPU builds, and where torch was not imported)
        "torch_cuda_build": torch.version.cuda if torch else None,
        "driver": nvidia_driver(),
    }


def capture(device: str = "cpu") -> dict[str, Any]:
    """Environment facts for a result on ``device`` (``cpu`` or ``cuda:N``)."""
    torch = _torch()
    env = dict(_static())
    env["time_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    env["torch_threads"] = torch.get_num_threads() if torch else None
    env["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    if device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env.update({"device_name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                    "cuda_runtime": torch.version.cuda,
                    "device_memory_mib": props.total_memory / 2**20,
                    "cudnn": torch.backends.cudnn.version()})
    else:
        env.update({"device_name": env["cpu_model"], "compute_capability": None, "cuda_runtime": None,
                    "device_memory_mib": None, "cudnn": None})
    return env
