"""TensorRT engine builds and engine loading: every TensorRT call of deploycomp lives in this module.

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
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploycomp import __version__, console
from deploycomp.errors import DeploycompError, InputFileError, MissingDependencyError, UsageError, check
from deploycomp.files import atomic_path, check_output, sha256, sidecar_path, write_sidecar
from deploycomp.registry import Registry

INSTALL_HINT = ('install it with `pip install "deploycomp[tensorrt]"` (TensorRT wheels come from NVIDIA\'s index '
                "pypi.nvidia.com) or use the images in docker/ (Dockerfile.x86 on an NVIDIA TensorRT base, "
                "Dockerfile.jetson on L4T/JetPack)")
DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH = 1, 8, 32
PRECISIONS = ("fp32", "fp16", "int8")
TRTEXEC_FALLBACKS = ("/usr/src/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")  # JetPack, NGC images


# --------------------------------------------------------------------------------------------------
# Pure parts: sizes, profiles, precision plan, trtexec command line, sidecar checks


def parse_workspace(text: str | int | None) -> int | None:
    """``"1G"``, ``"512M"``, ``"2048"`` (MiB, like trtexec) or bytes as int -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"--workspace must look like 512M, 2G or 1024 (MiB), got {text!r}")
    unit = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    value = int(float(m.group(1)) * unit)
    check(value > 0, f"--workspace must be positive, got {text!r}")
    return value


@dataclass(frozen=True)
class Profile:
    """One optimisation profile of the input tensor: min <= opt <= max shapes (batch varies)."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def batches(self) -> tuple[int, int, int]:
        return self.min[0], self.opt[0], self.max[0]

    def as_dict(self) -> dict[str, Any]:
        return {"input_name": self.input_name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def profile_shapes(input_name: str, input_shape: list, min_batch: int | None = None, opt_batch: int | None = None,
                   max_batch: int | None = None) -> Profile | None:
    """The optimisation profile for ``input_shape`` (batch axis ``None`` when dynamic).

    A fixed-batch ONNX needs no profile (None), and batch options must then match its batch.
    Defaults: min 1, opt 8, max 32, adjusted so that a single given bound is respected.
    """
    check(len(input_shape) >= 2 and all(isinstance(d, int) and d > 0 for d in input_shape[1:]),
          f"input {input_name} has shape {input_shape}: only the batch axis may be dynamic", InputFileError)
    given = {"--min-batch": min_batch, "--opt-batch": opt_batch, "--max-batch": max_batch}
    for flag, value in given.items():
        check(value is None or (isinstance(value, int) and value > 0), f"{flag} must be a positive integer, "
              f"got {value}")
    rest = tuple(input_shape[1:])
    if input_shape[0] is not None:
        fixed = input_shape[0]
        bad = [f"{flag} {v}" for flag, v in given.items() if v is not None and v != fixed]
        check(not bad, f"the ONNX model has a fixed batch of {fixed} ({', '.join(bad)} asked); re-export it "
              "with `deploycomp export --dynamic-batch` for a batch range")
        return None
    lo = min_batch or DEFAULT_MIN_BATCH
    hi = max_batch or max(DEFAULT_MAX_BATCH, lo, opt_batch or 0)
    opt = opt_batch or min(max(DEFAULT_OPT_BATCH, lo), hi)
    if min_batch is None and lo > opt:
        lo = opt
    check(lo <= opt, f"--min-batch {lo} is larger than --opt-batch {opt}: need min <= opt <= max")
    check(opt <= hi, f"--opt-batch {opt} is larger than --max-batch {hi}: need min <= opt <= max")
    return Profile(input_name, (lo, *rest), (opt, *rest), (hi, *rest))


def parse_version(version: str) -> tuple[int, int, int]:
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def tensorrt_major(version: str) -> int:
    return parse_version(version)[0]


@dataclass(frozen=True)
class PrecisionPlan:
    """How a requested precision is obtained from a given ONNX with a given TensorRT major version."""

    precision: str  # what the engine runs in
    onnx_precision: str  # what the graph carries (fp32 | fp16 | int8)
    trt_major: int
    quantize_first: str | None = None  # run `deploycomp quantize --precision X` before building
    builder_flags: tuple[str, ...] = ()  # names in tensorrt.BuilderFlag (TensorRT 10 weak typing only)
    strongly_typed: bool = True  # the network's types come from the graph
    notes: tuple[str, ...] = field(default_factory=tuple)


PrecisionRule = Callable[[str, str, int], PrecisionPlan]
PRECISION_RULES: Registry[PrecisionRule] = Registry("TensorRT major version",
                                                    hint="deploycomp supports TensorRT 10 and 11.")


@PRECISION_RULES.register("10")
def _plan_trt10(requested: str, onnx_precision: str, major: int) -> PrecisionPlan:
    if onnx_precision == "fp32" and requested == "fp16":
        return PrecisionPlan("fp16", "fp32", major, builder_flags=("FP16",), strongly_typed=False,
                             notes=("TensorRT 10 weak typing: BuilderFlag.FP16 lets TensorRT pick FP16 kernels "
                                    "(deprecated since 10.12, removed in 11; `deploycomp quantize --precision fp16` "
                                    "gives an FP16 graph that builds the same on both)",))
    if onnx_precision == "fp32" and requested == "int8":
        return PrecisionPlan("int8", "fp32", major, quantize_first="int8",
                             notes=("INT8 comes from Q/DQ nodes (explicit quantization), not TensorRT 10's deprecated "
                                    "calibrators: running `deploycomp quantize --precision int8` first",))
    return PrecisionPlan(requested, onnx_precision, major, strongly_typed=True)


@PRECISION_RULES.register("11")
def _plan_trt11(requested: str, onnx_precision: str, major: int) -> PrecisionPlan:
    if onnx_precision == "fp32" and requested in ("fp16", "int8"):
        return PrecisionPlan(requested, "fp32", major, quantize_first=requested,
                             notes=(f"TensorRT {major} is strongly typed and has no precision flags: the graph must "
                                    f"be {requested} already, so `deploycomp quantize --precision {requested}` runs "
                                    "first",))
    return PrecisionPlan(requested, onnx_precision, major, strongly_typed=True)


def plan_precision(requested: str | None, onnx_precision: str, trt_major: int) -> PrecisionPlan:
    """The precision plan; ``requested`` None means the graph's own precision."""
    requested = requested or onnx_precision
    check(requested in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if onnx_precision != "fp32" and requested != onnx_precision:
        raise UsageError(f"the ONNX model is already {onnx_precision}; build --precision {requested} from the FP32 "
                         f"ONNX (`deploycomp export`), or build this one with --precision {onnx_precision}")
    if trt_major < 10:
        raise MissingDependencyError(f"TensorRT {trt_major}.x is too old: deploycomp builds with TensorRT 10 or 11; "
                                     + INSTALL_HINT)
    rule = PRECISION_RULES.get(str(min(trt_major, 11)))  # 12+ keeps 11's strong typing until proven otherwise
    return rule(requested, onnx_precision, trt_major)


def trtexec_command(onnx: str | os.PathLike, engine: str | os.PathLike, plan: PrecisionPlan,
                    profile: Profile | None = None, *, workspace_bytes: int | None = None,
                    timing_cache: str | os.PathLike | None = None, dla_core: int | None = None,
                    trtexec: str = "trtexec", skip_inference: bool = True) -> list[str]:
    """The ``trtexec`` command that builds the same engine with ``plan.trt_major``'s trtexec."""
    cmd = [trtexec, f"--onnx={onnx}", f"--saveEngine={engine}"]
    if profile is not None:
        for key in ("min", "opt", "max"):
            dims = "x".join(str(d) for d in getattr(profile, key))
            cmd.append(f"--{key}Shapes={profile.input_name}:{dims}")
    if plan.trt_major < 11:  # TensorRT 11 removed the precision flags; strong typing is always on there
        cmd += [f"--{flag.lower()}" for flag in plan.builder_flags]
        if plan.strongly_typed:
            cmd.append("--stronglyTyped")
    if workspace_bytes:
        cmd.append(f"--memPoolSize=workspace:{max(1, workspace_bytes // 2**20)}")  # MiB: trtexec's default unit
    if timing_cache:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if dla_core is not None:
        cmd += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    if skip_inference:
        cmd.append("--skipInference")
    return cmd


def format_command(cmd: list[str]) -> str:
    return shlex.join(cmd)


def default_timing_cache(trt_version: str, compute_capability: str | None) -> Path:
    """One timing cache per TensorRT version and GPU architecture, shared by every build on this machine."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deploycomp"
    sm = f"sm{compute_capability.replace('.', '')}" if compute_capability else "gpu"
    return base / f"trt{trt_version}-{sm}.timing-cache"


def default_engine_path(onnx: str | os.PathLike, precision: str) -> Path:
    """``model.onnx`` -> ``model.engine``; ``model.onnx`` built as fp16 -> ``model.fp16.engine``."""
    p = Path(onnx)
    stem = p.stem
    return p.with_name(f"{stem}.engine" if stem.endswith(f".{precision}") or precision == "fp32"
                       else f"{stem}.{precision}.engine")


def check_engine_sidecar(side: dict[str, Any], trt_version: str, gpu_name: str | None,
                         compute_capability: str | None, engine: str | os.PathLike = "engine") -> list[str]:
    """Refuse an engine built by another TensorRT version or for another GPU architecture.

    Returns warnings (same architecture, different GPU model); raises :class:`InputFileError` otherwise.
    """
    built = side.get("tensorrt_version")
    if built and parse_version(built) != parse_version(trt_version):
        raise InputFileError(f"{engine} was built with TensorRT {built} but TensorRT {trt_version} is installed; "
                             f"engines only load in the TensorRT version that built them: rebuild it here with "
                             f"`deploycomp build {side.get('source_onnx', 'MODEL.onnx')}`")
    cc = side.get("compute_capability")
    if cc and compute_capability and cc != compute_capability:
        raise InputFileError(f"{engine} was built for {side.get('gpu_name', 'another GPU')} (compute capability {cc}) "
                             f"but this GPU is {gpu_name} (compute capability {compute_capability}); engines are "
                             f"not portable across GPUs: rebuild it here with "
                             f"`deploycomp build {side.get('source_onnx', 'MODEL.onnx')}`")
    name = side.get("gpu_name")
    if name and gpu_name and name != gpu_name:
        return [f"{engine} was built on {name}, this GPU is {gpu_name} (same compute capability {cc}); it loads, "
                "but its tactics were timed on the other GPU: rebuild for trustworthy timings"]
    return []


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
    cache = None
    if req.timing_cache is not None:
        data = req.timing_cache.read_bytes() if req.timing_cache.exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeploycompError(f"TensorRT could not build an engine from {req.onnx}; its messages above say why")
    engine_tmp.write_bytes(memoryview(serialized))
    if cache is not None:
        req.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(req.timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))


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
        "timing_cache": str(cache), "timing_cache_reused": cache_existed, "dla_core": dla_core,
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

    out = default_output(src, precision)
    if out.exists() and read_sidecar(out).get("source_onnx_sha256") == sha256(src):
        console.info(f"using {out}, already quantized from {src}")
        return out
    console.info(f"running: deploycomp quantize {src} --precision {precision} -o {out}")
    quantize_onnx(src, out, precision=precision, data=data, data_dir=data_dir, calib_samples=calib_samples,
                  calib_method=calib_method, evaluate=False)
    return out


# --------------------------------------------------------------------------------------------------
# Running an engine (the benchmark's TensorRT backend sits on this)


def read_engine_sidecar(engine: str | os.PathLike) -> dict[str, Any]:
    from deploycomp.files import read_json

    side = sidecar_path(engine)
    return read_json(side) if side.exists() else {}


class EngineRunner:
    """A deserialized engine with one execution context, bound to torch CUDA tensors.

    ``infer(x)`` enqueues on :attr:`stream` and returns the output tensor without synchronising:
    the caller synchronises (``runner.stream.synchronize()``) before reading it or stopping a clock.
    """

    def __init__(self, engine_path: str | os.PathLike, device: int = 0):
        import torch

        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise MissingDependencyError("running a TensorRT engine needs a CUDA GPU and a CUDA build of torch; "
                                         "none is visible here")
        from deploycomp.files import require_file

        self.path = require_file(engine_path, "TensorRT engine")
        self.device = torch.device("cuda", device)
        self.sidecar = read_engine_sidecar(self.path)
        gpu = gpu_info(device)
        for warning in check_engine_sidecar(self.sidecar, trt.__version__, gpu["gpu_name"],
                                            gpu["compute_capability"], self.path):
            console.warn(warning)
        if not self.sidecar:
            console.warn(f"{self.path} has no sidecar ({sidecar_path(self.path)}); cannot check which TensorRT/GPU "
                         "built it")
        self.trt_version = trt.__version__
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise InputFileError(f"TensorRT {trt.__version__} cannot deserialize {self.path}: not an engine, or "
                                     "built by another TensorRT version/GPU; rebuild it with `deploycomp build`")
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            check(len(inputs) == 1 and len(outputs) >= 1, f"{self.path} has inputs {inputs} and outputs {outputs}; "
                  "deploycomp runs single-input classifiers", InputFileError)
            self.input_name, self.output_name = inputs[0], outputs[0]
            self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
            self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
            shape = tuple(self.engine.get_tensor_shape(self.input_name))
            if shape[0] == -1:
                lo, opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
            else:
                lo = opt = hi = shape
            self.profile = {"min": lo, "opt": opt, "max": hi}
            # TensorRT 11 removed device_memory_size; device_memory_size_v2 exists since 10.1.
            self.device_memory_bytes = int(getattr(self.engine, "device_memory_size_v2", None)
                                           or getattr(self.engine, "device_memory_size", 0))
            self.weights_bytes = None  # TensorRT reports no total weight size for a regular engine
            self.engine_bytes = self.path.stat().st_size
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        self._out: Any = None
        self._inputs_alive: Any = None

    @property
    def batch_range(self) -> tuple[int, int]:
        return int(self.profile["min"][0]), int(self.profile["max"][0])

    def infer(self, x):
        """Enqueue one inference of ``x`` (a CUDA tensor, NCHW) on :attr:`stream`; no synchronisation."""
        import torch

        lo, hi = self.batch_range
        if not lo <= x.shape[0] <= hi:
            raise UsageError(f"batch {x.shape[0]} is outside the engine's profile ({lo}..{hi}); rebuild with "
                             f"`deploycomp build --min-batch/--max-batch` covering it")
        if tuple(x.shape[1:]) != tuple(self.profile["max"][1:]):
            raise UsageError(f"input shape {tuple(x.shape)} does not fit the engine's "
                             f"{('N', *self.profile['max'][1:])}")
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x may still be being written
        with torch.cuda.stream(self.stream):
            if x.device != self.device or x.dtype != self.input_dtype or not x.is_contiguous():
                x = x.to(self.device, self.input_dtype).contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            if self._out is None or tuple(self._out.shape) != out_shape:
                self._out = torch.empty(out_shape, dtype=self.output_dtype, device=self.device)
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, self._out.data_ptr())
            self._inputs_alive = x  # keep the (possibly converted) input alive until the next call
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise DeploycompError(f"TensorRT failed to enqueue {self.path} (execute_async_v3 returned False)")
        return self._out

    def close(self) -> None:
        self.context = None
        self.engine = None
        self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT8: torch.int8,
             trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[dtype]
