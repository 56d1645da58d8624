"""Pure parts of the TensorRT road: sizes, profiles, the precision plan, the trtexec command line, sidecar checks.

Plain Python, no TensorRT import: unit-tested on machines without TensorRT, and used by ``deploycomp
bundle`` to write the build command for another device's TensorRT.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploycomp.errors import InputFileError, MissingDependencyError, UsageError, check
from deploycomp.registry import Registry

INSTALL_HINT = ('install it with `pip install "deploycomp[tensorrt]"` (TensorRT wheels come from NVIDIA\'s index '
                "pypi.nvidia.com) or use the images in docker/ (Dockerfile.x86 on an NVIDIA TensorRT base, "
                "Dockerfile.jetson on L4T/JetPack)")
DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH = 1, 8, 32
PRECISIONS = ("fp32", "fp16", "int8")


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
                                    "calibrators: running `deploycomp quantize --precision int8 --target tensorrt` "
                                    "first",))
    return PrecisionPlan(requested, onnx_precision, major, strongly_typed=True)


@PRECISION_RULES.register("11")
def _plan_trt11(requested: str, onnx_precision: str, major: int) -> PrecisionPlan:
    if onnx_precision == "fp32" and requested in ("fp16", "int8"):
        return PrecisionPlan(requested, "fp32", major, quantize_first=requested,
                             notes=(f"TensorRT {major} is strongly typed and has no precision flags: the graph must "
                                    f"be {requested} already, so `deploycomp quantize --precision {requested}"
                                    f"{' --target tensorrt' if requested == 'int8' else ''}` runs first",))
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
