"""TensorRT engine builds and engine loading: every TensorRT call of deploycomp lives in this package.

``tensorrt`` is imported lazily, only by the functions that need it; everything else (profile shapes,
the precision plan per TensorRT major version, the equivalent ``trtexec`` command line, the engine
sidecar and its compatibility check) is plain Python, unit-tested on machines without TensorRT.

TensorRT 10 vs 11 (NVIDIA's "Migrating from TensorRT 10.x to 11.x"): TensorRT 11 removed the
precision builder flags (``BuilderFlag.FP16/INT8/...``), INT8 calibrators, the ``--fp16/--int8/--best``
flags of ``trtexec`` and ``ICudaEngine.device_memory_size`` (use ``device_memory_size_v2``); every
network is strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is ignored). Precision
therefore comes from the ONNX graph: an FP16 graph or INT8 Q/DQ nodes written by ``deploycomp quantize``.
TensorRT 10 still has the flags; deploycomp uses the FP16 flag there only when asked for FP16 from an
FP32 graph, and builds graphs that already carry their precision strongly typed, like TensorRT 11.

The package: ``plan.py`` (the pure parts: profiles, precision plan, trtexec command line, sidecar checks),
this module (finding TensorRT, the builders, :func:`build_engine`) and ``engine.py`` (:class:`EngineRunner`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploycomp import __version__, console
from deploycomp.errors import DeploycompError, InputFileError, MissingDependencyError, check
from deploycomp.files import atomic_path, check_output, sha256, write_sidecar
from deploycomp.registry import Registry
from deploycomp.trt.plan import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MIN_BATCH,
    DEFAULT_OPT_BATCH,
    INSTALL_HINT,
    PRECISION_RULES,
    PRECISIONS,
    PrecisionPlan,
    Profile,
    check_engine_sidecar,
    default_engine_path,
    default_timing_cache,
    format_command,
    parse_version,
    parse_workspace,
    plan_precision,
    profile_shapes,
    tensorrt_major,
    trtexec_command,
)

TRTEXEC_FALLBACKS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")  # JetPack, NGC images


# --------------------------------------------------------------------------------------------------
# Finding TensorRT


def tensorrt_available() -> bool:
    """True when the TensorRT Python package imports (the PyPI stub without libraries does not count)."""
    try:
        _import_tensorrt()
    except MissingDependencyError:
        return False
    return True


def _import_tensorrt():
    try:
        import tensorrt
    except Exception as e:  # ImportError, or OSError/RuntimeError when the wheel lacks its libraries
        raise MissingDependencyError(f"TensorRT is not installed or does not load ({type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else 'no module'}); "
                                     + INSTALL_HINT) from None
    if not hasattr(tensorrt, "Builder"):
        raise MissingDependencyError("the installed `tensorrt` package has no Builder (a stub without NVIDIA's "
                                     "libraries?); " + INSTALL_HINT)
    return tensorrt


def require_tensorrt():
    """The ``tensorrt`` module, or :class:`MissingDependencyError` saying how to get it."""
    return _import_tensorrt()


def trtexec_path() -> str | None:
    found = shutil.which("trtexec")
    if found:
        return found
    return next((p for p in TRTEXEC_FALLBACKS if os.access(p, os.X_OK)), None)


def trtexec_version(trtexec: str) -> str:
    """TensorRT version of a ``trtexec`` binary, from its banner ``[TensorRT v100300]``."""
    try:
        proc = subprocess.run([trtexec, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MissingDependencyError(f"cannot run {trtexec}: {e}; " + INSTALL_HINT) from None
    return version_from_banner(proc.stdout + proc.stderr, trtexec)


def version_from_banner(text: str, trtexec: str = "trtexec") -> str:
    m = re.search(r"TensorRT v(\d+)", text)
    if not m:
        raise MissingDependencyError(f"cannot tell which TensorRT {trtexec} belongs to (no '[TensorRT vNNNNNN]' in "
                                     "its output)")
    n = int(m.group(1))
    major, minor, patch = (n // 10000, n // 100 % 100, n % 100) if n >= 10000 else (n // 1000, n // 100 % 10, n % 100)
    return f"{major}.{minor}.{patch}"


def gpu_info(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of CUDA device ``device`` (None when no GPU is visible to torch)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return {"gpu_name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
                    "device_index": device}
    except Exception:  # a broken CUDA setup must not stop a trtexec build; the sidecar just says less
        pass
    return {"gpu_name": None, "compute_capability": None, "device_index": device}


# --------------------------------------------------------------------------------------------------
# Builders: the Python API first, trtexec as fallback


@dataclass
class BuildRequest:
    onnx: Path
    engine: Path
    plan: PrecisionPlan
    profile: Profile | None
    workspace_bytes: int | None
    timing_cache: Path | None
    dla_core: int | None
    timing_cache_rejected: bool = False  # set by the builder: TensorRT refused the cache file (built without it)


@dataclass(frozen=True)
class Builder:
    name: str
    version: Callable[[], str | None]  # installed TensorRT version, None when this builder is unavailable
    build: Callable[[BuildRequest, Path], None]  # (request, path to write the engine to)


BUILDERS: Registry[Builder] = Registry("TensorRT builder")
BUILDER_ORDER = ("python-api", "trtexec")


def _python_api_version() -> str | None:
    return require_tensorrt().__version__ if tensorrt_available() else None


def _trtexec_version() -> str | None:
    exe = trtexec_path()
    return trtexec_version(exe) if exe else None


def _build_python(req: BuildRequest, engine_tmp: Path) -> None:
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if req.plan.strongly_typed and req.plan.trt_major < 11:  # on 11 the flag is deprecated and ignored
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(req.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputFileError(f"TensorRT's ONNX parser rejects {req.onnx}: {errors[:500]}")
    config = builder.create_builder_config()
    if req.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, req.workspace_bytes)
    for flag in req.plan.builder_flags:  # TensorRT 10 only (the plan has none for 11)
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if req.profile is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(req.profile.input_name, req.profile.min, req.profile.opt, req.profile.max)
        config.add_optimization_profile(profile)
    if req.dla_core is not None:
        check(req.dla_core < builder.num_DLA_cores, f"--dla-core {req.dla_core}: this device has "
              f"{builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = req.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    keep_cache = req.timing_cache is not None and use_timing_cache(config, req.timing_cache)
    req.timing_cache_rejected = req.timing_cache is not None and not keep_cache
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeploycompError(f"TensorRT could not build an engine from {req.onnx}; its messages above say why")
    engine_tmp.write_bytes(memoryview(serialized))
    if keep_cache:
        save_timing_cache(config, req.timing_cache)


def use_timing_cache(config, path: Path) -> bool:
    """Give the builder the timing cache in ``path`` (empty when there is none); True when it took it.

    TensorRT refuses a cache made by another TensorRT version or GPU, or a file that is not one
    (``set_timing_cache`` returns False, ``create_timing_cache`` may return None). Then the build goes on
    with a fresh cache, and the file is left as it is: it may be a user's cache for another GPU.
    """
    data = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return True
    console.warn(f"TensorRT rejected the timing cache {path} (made by another TensorRT version or GPU, or not a "
                 "timing cache): building with a fresh one and leaving that file as it is; delete it, or give "
                 "another --timing-cache, to keep this GPU's timings")
    fresh = config.create_timing_cache(b"")
    if fresh is not None:
        config.set_timing_cache(fresh, ignore_mismatch=False)
    return False


def save_timing_cache(config, path: Path) -> None:
    """Write the builder's timing cache to ``path`` (atomically); a cache TensorRT cannot give is a warning.

    Called after the engine is written: whatever happens here, the engine is kept.
    """
    cache = config.get_timing_cache()
    try:
        data = cache.serialize() if cache is not None else None
    except RuntimeError:  # the bindings' translation of a TensorRT error
        data = None
    if data is None:
        console.warn(f"TensorRT gave no timing cache after the build; {path} is not updated (the engine is kept)")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(memoryview(data))
    except OSError as e:
        console.warn(f"could not write the timing cache {path} ({e.strerror or e}); the engine is kept")


def _build_trtexec(req: BuildRequest, engine_tmp: Path) -> None:
    exe = trtexec_path()
    if exe is None:
        raise MissingDependencyError("trtexec is not on PATH; " + INSTALL_HINT)
    if req.timing_cache is not None:
        req.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    cmd = trtexec_command(req.onnx, engine_tmp, req.plan, req.profile, workspace_bytes=req.workspace_bytes,
                          timing_cache=req.timing_cache, dla_core=req.dla_core, trtexec=exe)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not engine_tmp.exists() or engine_tmp.stat().st_size == 0:
        tail = [line for line in (proc.stdout + proc.stderr).splitlines() if "ERROR" in line][-3:]
        raise DeploycompError(f"trtexec failed (exit {proc.returncode}) building {req.onnx}: "
                              f"{' | '.join(tail) or 'no engine written'}; run it yourself for the full log")


BUILDERS.register("python-api", Builder("python-api", _python_api_version, _build_python))
BUILDERS.register("trtexec", Builder("trtexec", _trtexec_version, _build_trtexec))


def pick_builder(name: str | None = None) -> tuple[Builder, str]:
    """The builder to use and its TensorRT version: ``name``, else the Python API, else trtexec."""
    for candidate in ([name] if name else BUILDER_ORDER):
        builder = BUILDERS.get(candidate)
        version = builder.version()
        if version:
            return builder, version
    if name:
        raise MissingDependencyError(f"the {name} TensorRT builder is not available here; " + INSTALL_HINT)
    raise MissingDependencyError("building an engine needs TensorRT: neither its Python package nor trtexec was "
                                 "found; " + INSTALL_HINT)


# --------------------------------------------------------------------------------------------------
# build


def build_engine(onnx_path: str | os.PathLike, output: str | os.PathLike | None = None, *,
                 precision: str | None = None, min_batch: int | None = None, opt_batch: int | None = None,
                 max_batch: int | None = None, workspace: str | int | None = None,
                 timing_cache: str | os.PathLike | None = None, dla_core: int | None = None,
                 builder: str | None = None, data: str | None = None, data_dir: str | os.PathLike | None = None,
                 calib_samples: int | None = None, calib_method: str | None = None,
                 device: int = 0) -> dict[str, Any]:
    """Build a TensorRT engine from an ONNX model; returns the engine sidecar record.

    ``precision`` None means the graph's own. When the installed TensorRT cannot get the requested
    precision from this graph (FP16/INT8 from FP32 on TensorRT 11, INT8 on 10), the ONNX is converted
    first with :func:`deploycomp.quantize.quantize_onnx` (INT8 then needs ``data``) and that is said.
    """
    from deploycomp.export import io_info, load_onnx, onnx_precision, read_sidecar

    src = Path(onnx_path)
    model = load_onnx(src)
    io = io_info(model)
    workspace_bytes = parse_workspace(workspace)
    check(dla_core is None or dla_core >= 0, f"--dla-core must be >= 0, got {dla_core}")
    check(precision is None or precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}")
    profile = profile_shapes(io["input_name"], io["input_shape"], min_batch, opt_batch, max_batch)
    graph_precision = onnx_precision(model)
    if precision is not None and graph_precision != "fp32" and precision != graph_precision:
        plan_precision(precision, graph_precision, 11)  # raises the one-line error before looking for TensorRT
    if graph_precision == "int8":
        from deploycomp.quantize import check_int8_for_tensorrt

        check_int8_for_tensorrt(src, model)  # an ort-cpu graph is a one-line error, before looking for TensorRT
    chosen, version = pick_builder(builder)
    gpu = gpu_info(device)
    plan = plan_precision(precision, graph_precision, tensorrt_major(version))
    for note in plan.notes:
        console.info(note)
    if plan.quantize_first:
        src = _quantized_source(src, plan.quantize_first, data, data_dir, calib_samples, calib_method)
        plan = plan_precision(plan.precision, plan.quantize_first, plan.trt_major)
    engine = Path(output) if output else default_engine_path(src, plan.precision)
    check_output(engine, src, onnx_path)
    cache = Path(timing_cache) if timing_cache else default_timing_cache(version, gpu["compute_capability"])
    cmd = trtexec_command(src, engine, plan, profile, workspace_bytes=workspace_bytes, timing_cache=cache,
                          dla_core=dla_core)
    console.info(f"equivalent trtexec command (TensorRT {plan.trt_major}): {format_command(cmd)}")
    req = BuildRequest(src, engine, plan, profile, workspace_bytes, cache, dla_core)
    cache_existed = cache.exists()
    start = time.perf_counter()
    with atomic_path(engine) as tmp, console.status_line(f"building {engine} with TensorRT {version} "
                                                         f"({chosen.name}, {plan.precision})"):
        chosen.build(req, tmp)
    seconds = time.perf_counter() - start
    side = read_sidecar(src)
    record = {
        "command": "build", "engine": str(engine), "format": "tensorrt", "tensorrt_version": version,
        "tensorrt_major": plan.trt_major, "builder": chosen.name, **gpu, "precision": plan.precision,
        "plan": asdict(plan), "input_name": io["input_name"], "output_name": io["output_name"],
        "input_shape": io["input_shape"], "profile": profile.as_dict() if profile else None,
        "source_onnx": str(src), "source_onnx_sha256": sha256(src), "workspace_bytes": workspace_bytes,
        "timing_cache": str(cache), "timing_cache_reused": cache_existed and not req.timing_cache_rejected,
        "timing_cache_rejected": req.timing_cache_rejected, "dla_core": dla_core,
        "trtexec_command": format_command(cmd), "build_seconds": seconds, "engine_sha256": sha256(engine),
        "size_mib": engine.stat().st_size / 2**20, "deploycomp": __version__,
        **{k: side[k] for k in ("mean", "std", "class_names", "dataset", "arch", "macs", "params_total")
           if k in side},
    }
    write_sidecar(engine, record)
    return record


def _quantized_source(src: Path, precision: str, data, data_dir, calib_samples, calib_method) -> Path:
    """The ``precision`` ONNX made from ``src``; reused when an up-to-date one is already beside it."""
    from deploycomp.export import read_sidecar
    from deploycomp.quantize import default_output, quantize_onnx

    target = "tensorrt" if precision == "int8" else None  # INT8 Q/DQ placed the way TensorRT fuses it
    out = default_output(src, precision, target)
    side = read_sidecar(out) if out.exists() else {}
    if side.get("source_onnx_sha256") == sha256(src) and (side.get("quantization") or {}).get("target") == target:
        console.info(f"using {out}, already quantized from {src}")
        return out
    flag = f" --target {target}" if target else ""
    console.info(f"running: deploycomp quantize {src} --precision {precision}{flag} -o {out}")
    quantize_onnx(src, out, precision=precision, data=data, data_dir=data_dir, calib_samples=calib_samples,
                  calib_method=calib_method, evaluate=False, target=target)
    return out


from deploycomp.trt.engine import EngineRunner, read_engine_sidecar  # noqa: E402 (needs the functions above)

__all__ = [
    "DEFAULT_MAX_BATCH", "DEFAULT_MIN_BATCH", "DEFAULT_OPT_BATCH", "INSTALL_HINT", "PRECISIONS", "PRECISION_RULES",
    "TRTEXEC_FALLBACKS", "BuildRequest", "Builder", "EngineRunner", "PrecisionPlan", "Profile", "build_engine",
    "check_engine_sidecar", "default_engine_path", "default_timing_cache", "format_command", "gpu_info",
    "parse_version", "parse_workspace", "pick_builder", "plan_precision", "profile_shapes", "read_engine_sidecar",
    "require_tensorrt", "tensorrt_available", "tensorrt_major", "trtexec_command", "trtexec_path",
    "trtexec_version", "version_from_banner",
]
