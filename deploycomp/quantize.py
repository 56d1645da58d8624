"""ONNX precision: FP16 conversion and INT8 static post-training quantization shaped for a target runtime.

Precision lives in the ONNX graph (see ARCHITECTURE.md, "Precision and TensorRT"): TensorRT 11 is
strongly typed and takes its precision from the graph, TensorRT 10 builds it as well, and ONNX Runtime
runs it on any CPU, so the accuracy of the converted model is measured here, before any engine exists.

* ``fp16``: onnxconverter-common's ``convert_float_to_float16`` with ``keep_io_types`` (the model
  still takes and returns FP32, so preprocessing does not change).
* ``int8``: onnxruntime.quantization's ``quantize_static`` in ``QuantFormat.QDQ``, shaped for the
  runtime that will execute the graph (an INT8 *target*, registered in :data:`INT8_TARGETS`):

  - ``tensorrt``: what TensorRT's explicit quantization takes: symmetric INT8 activations and
    per-channel symmetric INT8 weights (zero points 0), FP32 bias, Q/DQ only on the inputs of weighted
    layers (Conv, Gemm, MatMul), never on their outputs, so that TensorRT fuses convolution + residual
    add (+ ReLU) ("Q/DQ Layer-Placement Recommendations" of the TensorRT developer guide).
  - ``ort-cpu``: what ONNX Runtime's CPU kernels run fastest: U8S8 (uint8 asymmetric activations,
    per-channel symmetric int8 weights), INT32 bias, Q/DQ around every operator ONNX Runtime has an
    integer kernel for (QLinearConv, QLinearAdd, ...), ``reduce_range`` (7-bit weights) only on an x86
    CPU without VNNI, where U8S8's VPMADDUBSW can saturate.

  Calibration images come from the dataset's *training* split through
  :func:`deploycomp.data.calibration_batches`; accuracy is reported on the *test* split.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploycomp import __version__, console
from deploycomp.errors import UsageError, check
from deploycomp.export import (
    compare,
    io_info,
    load_onnx,
    onnx_precision,
    ort_batch,
    ort_run,
    ort_run_all,
    ort_session,
    read_sidecar,
)
from deploycomp.files import atomic_path, check_output, sha256, write_sidecar
from deploycomp.registry import Registry

DEFAULT_CALIB_SAMPLES = 512
DEFAULT_CALIB_BATCH = 32
PERCENTILE = 99.999  # the percentile calibrator's clipping point


@dataclass(frozen=True)
class Precision:
    name: str
    convert: Callable[..., dict[str, Any]]  # (src Path, dst Path, opts: QuantizeOptions) -> details for the sidecar
    needs_data: bool
    description: str


PRECISIONS: Registry[Precision] = Registry("ONNX precision", hint="Valid: fp16, int8 (fp32 is what export writes).")
CALIBRATION_METHODS: Registry[str] = Registry("calibration method")
for _name, _enum in (("minmax", "MinMax"), ("entropy", "Entropy"), ("percentile", "Percentile")):
    CALIBRATION_METHODS.register(_name, _enum)  # name -> onnxruntime.quantization.CalibrationMethod member


def register_precision(name: str, *, needs_data: bool, description: str):
    def wrap(fn):
        PRECISIONS.register(name, Precision(name, fn, needs_data, description))
        return fn

    return wrap


@dataclass(frozen=True)
class Int8Target:
    """How an INT8 Q/DQ graph is shaped for the runtime that will execute it (an entry of INT8_TARGETS)."""

    name: str
    runtime: str  # in words, e.g. "TensorRT (explicit quantization)"
    backends: tuple[str, ...]  # deploycomp.bench backends the graph is made for
    devices: tuple[str, ...]  # devices of those backends ("cpu", "cuda")
    activations: str  # "int8" | "uint8"
    activation_symmetric: bool  # zero point 0 for activations
    quantize_bias: bool  # False: FP32 bias (TensorRT quantizes it itself)
    op_types: tuple[str, ...] | None  # operators that get Q/DQ on their inputs; None: onnxruntime's default set
    float_outputs: tuple[str, ...]  # operator types whose outputs get no Q/DQ
    float_layers: Callable[[Any], list[str]]  # onnx.ModelProto -> names of the nodes kept in float
    reduce_range: Callable[[], bool]  # 7-bit weights (decided on the quantizing machine)
    description: str  # one line for --help and the docs
    hint: str  # what bench says when this INT8 graph is slower than FP32 on a backend it is not made for
    quant_format: str = "QDQ"  # onnxruntime QuantFormat: QDQ (portable) or QOperator (QLinearConv, ...)

    def made_for(self, backend: str, device: str | None = None) -> bool:
        """Whether a graph of this target is meant to run on ``backend`` (a bench backend name) on ``device``."""
        return backend in self.backends and (device is None or device.split(":")[0] in self.devices)


INT8_TARGETS: Registry[Int8Target] = Registry("INT8 target", hint="Pass --target NAME, e.g. --target ort-cpu.")
# `deploycomp quantize` makes what ONNX Runtime on the CPU, the backend every deploycomp machine has (and the one
# quantize itself checks accuracy with), runs fastest; `build` and `bundle` make TensorRT's own.
DEFAULT_INT8_TARGET = "ort-cpu"
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def first_and_last_layers(model) -> list[str]:
    """Names of the first convolution and the last Gemm/MatMul (the classifier).

    These two layers are the most sensitive to 8-bit rounding (the raw input and the logits). With
    symmetric INT8 activations, keeping them in float turns a 2.7-point top-1 loss of the shipped
    Fashion-MNIST baseline into less than 0.2 points (minmax, 512 calibration images); TensorRT runs
    them in FP16/FP32 within the same engine at little cost.
    """
    nodes = model.graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return convs[:1] + heads[-1:]


def no_float_layers(model) -> list[str]:
    return []


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def has_vnni() -> bool | None:
    """Whether this x86 CPU has an 8-bit dot-product instruction (AVX512-VNNI, AVX-VNNI, AMX); None: unknown."""
    flags = cpu_flags()
    if flags is None:
        return None
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def reduce_range_without_vnni() -> bool:
    """ONNX Runtime's advice: U8S8 on x86 without VNNI uses VPMADDUBSW, whose 16-bit sums can saturate;
    7-bit weights (``reduce_range``) avoid it. VNNI CPUs and ARM have no such issue. Unknown x86: reduce."""
    return _is_x86() and not has_vnni()


INT8_TARGETS.register("tensorrt", Int8Target(
    name="tensorrt", runtime="TensorRT (explicit quantization)", backends=("trt",), devices=("cuda",),
    activations="int8", activation_symmetric=True, quantize_bias=False, op_types=WEIGHTED_OPS,
    float_outputs=WEIGHTED_OPS, float_layers=first_and_last_layers, reduce_range=lambda: False,
    description="symmetric INT8, per-channel weights, Q/DQ on the inputs of Conv/Gemm only (TensorRT fuses "
                "conv+add); first conv and classifier in float",
    hint="quantized for tensorrt (symmetric INT8 Q/DQ that only TensorRT fuses); for ONNX Runtime on the CPU "
         "use `deploycomp quantize --target ort-cpu`"))
INT8_TARGETS.register("ort-cpu", Int8Target(
    name="ort-cpu", runtime="ONNX Runtime, CPU execution provider", backends=("ort",), devices=("cpu",),
    activations="uint8", activation_symmetric=False, quantize_bias=True, op_types=None, float_outputs=(),
    float_layers=no_float_layers, reduce_range=reduce_range_without_vnni,
    description="U8S8 Q/DQ (uint8 activations, per-channel int8 weights, int32 bias), every layer with an integer "
                "kernel in ONNX Runtime; 7-bit weights on x86 without VNNI",
    hint="quantized for ONNX Runtime on the CPU (ort-cpu); for TensorRT use `deploycomp quantize --target tensorrt` "
         "or `deploycomp build MODEL.onnx --precision int8`"))


def target_hint(record: dict[str, Any], backend: str, device: str | None = None) -> str:
    """One line saying why an INT8 model may be slower than its FP32 original on ``backend`` (for bench).

    ``record`` is the sidecar of an INT8 model. Names the target it was made for when that is not
    ``backend``, else says that INT8 does not pay off for this model on this backend.
    """
    name = (record.get("quantization") or {}).get("target")
    if name is None:
        return ("quantized by an older deploycomp (symmetric INT8 for TensorRT); re-run `deploycomp quantize` "
                f"(default --target {DEFAULT_INT8_TARGET}) for ONNX Runtime on the CPU")
    if name not in INT8_TARGETS:
        return f"quantized for an unknown target {name!r}"
    target = INT8_TARGETS.get(name)
    if not target.made_for(backend, device):
        return target.hint
    return (f"quantized for this backend ({name}), yet slower: INT8 does not pay off for this model here "
            "(too small, or its time goes to layers kept in float); keep FP32")


def check_int8_for_tensorrt(path: str | os.PathLike, model) -> None:
    """Refuse an INT8 graph that TensorRT cannot build as quantized: uint8 Q/DQ or operator-format (QLinear*) nodes.

    TensorRT's explicit quantization takes signed INT8 Q/DQ only; an ``ort-cpu`` graph has uint8 activations.
    """
    from onnx import TensorProto

    inits = {i.name: i.data_type for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    unsigned = any(len(n.input) > 2 and inits.get(n.input[2]) == TensorProto.UINT8 for n in qdq)
    operator_format = any(n.op_type.startswith("QLinear") for n in model.graph.node)
    if unsigned or operator_format:
        made_for = (read_sidecar(path).get("quantization") or {}).get("target") or "ONNX Runtime"
        what = "uint8 activations" if unsigned else "QLinear operators"
        raise UsageError(f"{path} is INT8 quantized for {made_for} ({what}), which TensorRT cannot build; build the "
                         "FP32 model with --precision int8, or make this one with "
                         "`deploycomp quantize FP32.onnx -p int8 --target tensorrt`")


def fp32_source(path: str | os.PathLike) -> Path | None:
    """The FP32 ONNX a quantized model was made from, from its sidecar; None when it is gone or changed.

    Looks beside the model first (``source_onnx_relative``: both files moved together), then at the
    recorded ``source_onnx`` path; a candidate counts only when its SHA-256 is the recorded one.
    """
    side = read_sidecar(path)
    digest = side.get("source_onnx_sha256")
    if side.get("command") != "quantize" or not digest:
        return None
    here = Path(path).resolve().parent
    for ref in (side.get("source_onnx_relative"), side.get("source_onnx")):
        if ref:
            candidate = here / ref if side.get("source_onnx_relative") == ref else Path(ref)
            if candidate.is_file() and sha256(candidate) == digest:
                return candidate.resolve()
    return None


@dataclass
class QuantizeOptions:
    dataset: Any = None  # calibration split (torch Dataset), int8 only
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_batch: int = DEFAULT_CALIB_BATCH
    calib_method: str = "minmax"  # a name in CALIBRATION_METHODS
    model_batch: int | None = None  # the ONNX input's fixed batch (None: dynamic)
    input_name: str = "input"
    seed: int = 0
    quantize_all_layers: bool = False  # True: no layer stays in float, whatever the target keeps
    target: str = DEFAULT_INT8_TARGET  # a name in INT8_TARGETS
    extra_float_nodes: tuple[str, ...] = ()  # nodes kept in float on top of the target's (--max-drop's choice)
    ranges_cache: Path | None = None  # activation ranges: read when the file exists, else calibrated and saved there


@register_precision("fp16", needs_data=False, description="FP16 weights and compute, FP32 inputs/outputs")
def _to_fp16(src: Path, dst: Path, opts: QuantizeOptions) -> dict[str, Any]:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    # The exporter's intermediate type annotations go: the converter trusts them over the types it gives, and a
    # node it keeps in float (Resize, NMS, TopK) feeding a converted one then gets a cast ONNX Runtime rejects.
    del model.graph.value_info[:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per weight clipped to the FP16 range; summarised below
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))
    return {"converter": "onnxconverter-common float16.convert_float_to_float16", "keep_io_types": True}


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def postprocessing_nodes(model) -> list[str]:
    """The nodes of a detector's in-graph post-processing, kept in float: in a graph with a
    NonMaxSuppression, every node that no weighted layer depends on (box decoding, scores, NMS, the
    fixed-size outputs), and the predictors feeding only those (the class and box convolutions: their
    outputs are the logits and box distances, which 8 bits would round). Empty for a graph without NMS."""
    nodes = model.graph.node
    if not any(n.op_type == "NonMaxSuppression" for n in nodes):
        return []
    producer = {out: n for n in nodes for out in n.output}
    network: set[int] = set()
    stack = [n for n in nodes if n.op_type in WEIGHTED_OPS]
    while stack:
        n = stack.pop()
        if id(n) in network:
            continue
        network.add(id(n))
        stack += [producer[i] for i in n.input if i in producer]
    post = {id(n) for n in nodes if id(n) not in network}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for n in nodes:
        users = [u for out in n.output for u in consumers.get(out, [])]
        if n.op_type in WEIGHTED_OPS and users and all(id(u) in post for u in users):
            post.add(id(n))
    return [n.name for n in nodes if id(n) in post]


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader over deploycomp's calibration batches."""

    def __init__(self, batches: list, input_name: str):
        self.batches, self.input_name, self.i = batches, input_name, 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


@register_precision("int8", needs_data=True,
                    description="INT8 Q/DQ shaped for a target runtime: ort-cpu (U8S8) or tensorrt (symmetric S8S8)")
def _to_int8(src: Path, dst: Path, opts: QuantizeOptions) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from deploycomp.data import calibration_batches

    target = INT8_TARGETS.get(opts.target)
    method = CALIBRATION_METHODS.get(opts.calib_method)
    batch = opts.model_batch or opts.calib_batch
    samples = max(batch, opts.calib_samples // batch * batch)  # whole batches of the size the model takes
    if opts.ranges_cache is not None and opts.ranges_cache.is_file():
        batches = []  # calibrated before: the saved ranges are used
    else:
        batches = [x.numpy() for x, _ in calibration_batches(opts.dataset, samples, batch, seed=opts.seed)]
        console.info(f"calibrating INT8 for {target.name} ({opts.calib_method}) on {samples} images in "
                     f"{len(batches)} batches")
    reduce_range = target.reduce_range()
    activation_type = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[target.activations]
    with tempfile.TemporaryDirectory() as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre))
        float_nodes = [] if opts.quantize_all_layers else target.float_layers(graph)
        float_nodes += [n for n in opts.extra_float_nodes if n not in float_nodes]
        post = postprocessing_nodes(graph)  # a detector's decoding and NMS: always float, even with --all-layers
        float_nodes += [n for n in post if n not in float_nodes]
        extra = {"ActivationSymmetric": target.activation_symmetric, "WeightSymmetric": True,
                 "QuantizeBias": target.quantize_bias,
                 "OpTypesToExcludeOutputQuantization": list(target.float_outputs)}
        if opts.calib_method == "percentile":
            extra["CalibPercentile"] = PERCENTILE
        chatter = io.StringIO()  # the histogram calibrators print() their progress; stdout is for results
        reader, cache = _CalibrationReader(batches, opts.input_name), None
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            if opts.ranges_cache is not None and opts.ranges_cache.is_file():
                cache, reader = opts.ranges_cache, None  # the ranges of an earlier calibration (--max-drop)
            elif method != "MinMax" or opts.ranges_cache is not None:
                # quantize_static does not pass histogram sizes on, and with its default 128 bins the entropy
                # search has a single candidate (the min/max range): collect the ranges here with TensorRT's
                # classic 2048 histogram bins and hand them over as a calibration cache. (MinMax goes this way
                # too when the ranges are kept for more quantizations of the same model.)
                cache = opts.ranges_cache or Path(work) / "ranges.json"
                _histogram_ranges(pre, Path(work), method, reader, cache, target.activation_symmetric)
                reader = None
            quantize_static(str(pre), str(dst), reader, quant_format=getattr(QuantFormat, target.quant_format),
                            per_channel=True, reduce_range=reduce_range, activation_type=activation_type,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(target.op_types or []) or None,
                            calibrate_method=getattr(CalibrationMethod, method), extra_options=extra,
                            calibration_cache_path=cache, nodes_to_exclude=float_nodes)
        for line in chatter.getvalue().splitlines():
            console.debug(line)
    vnni = has_vnni()
    return {"target": target.name, "runtime": target.runtime, "made_for_backends": list(target.backends),
            "description": target.description,
            "quantizer": "onnxruntime.quantization.quantize_static", "format": target.quant_format,
            "activations": f"{target.activations} {'symmetric' if target.activation_symmetric else 'asymmetric'}",
            "weights": "int8 symmetric per-channel" + (" (7-bit range)" if reduce_range else ""),
            "bias": "int32" if target.quantize_bias else "fp32", "reduce_range": reduce_range,
            "quantized_op_types": list(target.op_types) if target.op_types else "onnxruntime default",
            "float_output_op_types": list(target.float_outputs),
            "quantizing_cpu": {"x86": _is_x86(), "vnni": vnni},
            "calib_method": opts.calib_method, "calib_samples": samples, "calib_batch": batch,
            "calib_split": "train", "calib_seed": opts.seed, "float_nodes": float_nodes,
            **({"calib_histogram_bins": 2048} if opts.calib_method != "minmax" else {}),
            **({"calib_percentile": PERCENTILE} if opts.calib_method == "percentile" else {})}


def _histogram_ranges(model: Path, work: Path, method: str, reader, cache: Path, symmetric: bool) -> None:
    """Activation ranges from an entropy/percentile histogram calibration, saved as an ORT calibration cache."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    options = {"symmetric": symmetric, "num_bins": 2048, "num_quantized_bins": 128, "percentile": PERCENTILE}
    calibrator = create_calibrator(model, sorted(set(QDQRegistry) | set(QLinearOpsRegistry)),
                                   augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, method), extra_options=options)
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


# --------------------------------------------------------------------------------------------------


def default_output(onnx_path: str | os.PathLike, precision: str, target: str | None = None) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx`` / ``model.int8.onnx`` (the default INT8 target) /
    ``model.int8-tensorrt.onnx`` (another INT8 target), so that the targets never overwrite each other."""
    p = Path(onnx_path)
    suffix = precision if target in (None, DEFAULT_INT8_TARGET) or precision != "int8" else f"{precision}-{target}"
    return p.with_name(f"{p.stem}.{suffix}.onnx")


def evaluate_onnx(path: str | os.PathLike, dataset, samples: int | None = None, batch_size: int = 256,
                  seed: int = 0, task=None) -> dict[str, Any]:
    """The task's metrics (default: top-1) of an ONNX model on ``dataset`` with ONNX Runtime CPU; also
    returns ``predictions``, what the task compares between two runs (argmax labels per image or pixel;
    detections)."""
    import numpy as np
    import torch

    from deploycomp.data import make_loader, subset

    session = ort_session(path)
    fixed = ort_batch(session)
    data = subset(dataset, samples, seed=seed)
    preds, meter = [], None
    for x, y in console.progress(make_loader(data, batch_size), total=None, description=f"ORT {Path(path).name}"):
        if fixed is not None:  # a static-batch model: feed it pieces of its own batch size
            n = x.shape[0] // fixed * fixed
            x, y = x[:n], y[:n]
            if n == 0:
                continue
            runs = [ort_run_all(session, x[i:i + fixed]) for i in range(0, n, fixed)]
            out = [np.concatenate(parts) for parts in zip(*runs, strict=True)]
        else:
            out = ort_run_all(session, x)
        if meter is None:
            from deploycomp.tasks import get_task

            task = task or get_task("classification", int(out[0].shape[1]))
            meter = task.meter()
        outputs = task.from_onnx(out)
        meter.update(outputs, torch.as_tensor(y))
        preds.append(task.predictions(outputs))
    check(meter is not None, f"no test sample reached {path}: the test set is smaller than its batch size")
    return {**meter.result(), "predictions": _concat(preds)}


def _concat(parts):
    import numpy as np
    import torch

    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def quantize_onnx(onnx_path: str | os.PathLike, output: str | os.PathLike | None = None, *, precision: str,
                  data: str | None = None, data_dir: str | os.PathLike | None = None,
                  calib_samples: int | None = None, calib_batch: int | None = None, calib_method: str | None = None,
                  eval_samples: int | None = None, evaluate: bool = True, seed: int = 0,
                  quantize_all_layers: bool = False, target: str | None = None, max_drop: float | None = None,
                  sensitivity: bool = False, rank_samples: int | None = None,
                  bench: bool = True) -> dict[str, Any]:
    """Convert an FP32 ONNX model to ``precision`` (``fp16`` or ``int8``) and measure what it costs.

    ``target`` (INT8 only) names the runtime the graph is shaped for, a name in :data:`INT8_TARGETS`;
    None means :data:`DEFAULT_INT8_TARGET` (ONNX Runtime on the CPU); ``build`` and ``bundle`` pass
    ``tensorrt``. The dataset is ``data`` or the one named in the ONNX sidecar (written by ``deploycomp export``).
    INT8 needs it for calibration; for both precisions it gives the top-1 of the converted model against
    the FP32 one (ONNX Runtime CPU, ``eval_samples`` test images, default all). Returns the sidecar record.

    INT8 only (see :mod:`deploycomp.sensitivity`): ``max_drop`` (points) keeps the most sensitive weighted
    layers in float until the drop on a validation subset of the training split (``rank_samples`` images)
    is within it, and with ``bench`` times the result against full INT8 and FP32 on ort-cpu;
    ``sensitivity`` writes the per-layer report beside the output (``.sensitivity.md/.json/.png``).
    """
    import onnx

    spec = PRECISIONS.get(precision)
    calib_method = calib_method or "minmax"
    CALIBRATION_METHODS.get(calib_method)
    check(target is None or precision == "int8", f"--target applies to --precision int8 only, not {precision}")
    target = INT8_TARGETS.get(target or DEFAULT_INT8_TARGET).name
    src = Path(onnx_path)
    model = load_onnx(src)
    found = onnx_precision(model)
    check(found == "fp32", f"{src} is already {found}; quantize starts from the FP32 model written by "
          "`deploycomp export`")
    io = io_info(model)
    out = Path(output) if output else default_output(src, precision, target)
    check(out.suffix == ".onnx", f"output {out} should end in .onnx")
    check_output(out, src)
    side = read_sidecar(src)
    name = data or side.get("dataset")
    opts = QuantizeOptions(calib_samples=calib_samples or DEFAULT_CALIB_SAMPLES,
                           calib_batch=calib_batch or DEFAULT_CALIB_BATCH, calib_method=calib_method,
                           model_batch=None if io["dynamic_batch"] else io["input_shape"][0],
                           input_name=io["input_name"], seed=seed, quantize_all_layers=quantize_all_layers,
                           target=target)
    check(opts.calib_samples > 0, f"--calib-samples must be positive, got {opts.calib_samples}")
    check(opts.calib_batch > 0, f"--calib-batch must be positive, got {opts.calib_batch}")
    check(eval_samples is None or eval_samples > 0, f"--eval-samples must be positive, got {eval_samples}")
    check(rank_samples is None or rank_samples > 0, f"--rank-samples must be positive, got {rank_samples}")
    if spec.needs_data and not name:
        raise UsageError(f"INT8 calibration needs data: {src} has no sidecar naming its dataset; pass --data NAME "
                         "(and --data-dir DIR), e.g. --data fashion-mnist")
    guard = max_drop is not None or sensitivity
    if guard:
        from deploycomp.sensitivity import DEFAULT_RANK_SAMPLES, check_max_drop

        check_max_drop(max_drop)
        what = "--max-drop" if max_drop is not None else "--sensitivity"
        check(precision == "int8", f"{what} applies to --precision int8 only, not {precision}")
        check(evaluate, f"{what} measures accuracy on labelled data; drop --no-eval")
        rank_samples = rank_samples or DEFAULT_RANK_SAMPLES
    test = task = None
    if name:
        from deploycomp.data import load_dataset

        hw = tuple(io["input_shape"][2:])
        hw = hw if all(isinstance(d, int) for d in hw) and len(hw) == 2 else None
        if spec.needs_data:
            opts.dataset, info = load_dataset(name, "train", data_dir, input_size=hw)
            if guard and info.synthetic:
                raise UsageError(f"{'--max-drop' if max_drop is not None else '--sensitivity'} needs labelled "
                                 f"data to measure accuracy on, and {name} is synthetic (random labels); pass "
                                 "--data NAME with a real dataset, e.g. --data fashion-mnist")
            _check_channels(info, io, name)
            if info.synthetic:
                console.warn(f"calibrating on synthetic data ({name}): the INT8 scales and accuracy mean nothing")
        if evaluate:
            from deploycomp.tasks import task_for_data

            test, info = load_dataset(name, "test", data_dir, input_size=hw)
            _check_channels(info, io, name)
            task = task_for_data(info)

    with contextlib.ExitStack() as stack:
        found_guard = None
        if guard:
            found_guard = _guard(src, opts, Path(stack.enter_context(tempfile.TemporaryDirectory())), max_drop,
                                 sensitivity, rank_samples, task)
        with atomic_path(out) as tmp:
            with console.status_line(f"converting {src} to {precision}"):
                details = spec.convert(src, tmp, opts)
            onnx.checker.check_model(str(tmp))
            record = _record(src, out, side, precision, details, io)
            record["parity_vs_fp32"] = _random_parity(src, tmp, io)
            if test is not None:
                record["accuracy"] = _accuracy(src, tmp, test, eval_samples, name, seed, task)
        if found_guard is not None:
            record["quantization"]["guard"] = _finish_guard(found_guard, src, out, record, max_drop, bench)
    record["onnx_sha256"] = sha256(out)
    record["size_mib"] = out.stat().st_size / 2**20
    record["source_size_mib"] = src.stat().st_size / 2**20
    write_sidecar(out, record)
    return record


def _guard(src: Path, opts: QuantizeOptions, work: Path, max_drop: float | None, sensitivity: bool,
           rank_samples: int, task=None) -> dict[str, Any]:
    """Rank the layers on a validation subset (and choose the float ones for ``max_drop``); sets ``opts``."""
    from deploycomp import sensitivity as sens

    batch = opts.model_batch or opts.calib_batch
    opts.ranges_cache = work / "ranges.json"  # one calibration for every variant and for the output
    val = sens.validation_subset(opts.dataset, max(opts.calib_samples, batch), rank_samples, seed=opts.seed)
    metric = sens.metric_of(task)
    with console.status_line(f"FP32 {metric} on {len(val)} validation images"), sens._quietly():
        fp32 = evaluate_onnx(src, val, task=task)[metric]
    found = sens.search(src, opts, val, work, fp32, max_drop, sensitivity, task)
    opts.extra_float_nodes = tuple(sens.float_nodes(found.get("float_layers", [])))
    return found


def _finish_guard(found: dict[str, Any], src: Path, out: Path, record: dict[str, Any], max_drop: float | None,
                  bench: bool) -> dict[str, Any]:
    """The guard's sidecar entry: the float layers' speed on ort-cpu and the sensitivity files."""
    from deploycomp import sensitivity as sens

    variants = found.pop("_variants", None)
    acc = record.get("accuracy")
    if max_drop is not None and acc is not None:
        drop = acc[acc.get("metric", "top1_pct").removesuffix("_pct") + "_drop_points"]
        found["test_drop_points"] = drop
        if drop > max_drop:
            console.warn(f"--max-drop {max_drop:g} was met on the validation subset "
                         f"({found['validation_drop_points']:.2f} points) but the test split drops "
                         f"{drop:.2f}: the subset is small or unlike the test split; "
                         "raise --rank-samples or lower --max-drop")
    if max_drop is not None and variants is not None:
        chosen = found["float_layers"]
        if not bench:
            found["speed"] = None
        elif record["quantization"]["target"] != "ort-cpu":
            found["speed"] = None
            console.info(f"speed not measured: a {record['quantization']['target']} graph is timed on its own "
                         f"runtime (`deploycomp bench {out}` on that machine)")
        else:
            found["speed"] = sens.speed(src, variants, chosen)
    if found.get("sensitivity"):
        from deploycomp.files import write_json

        base = out.with_suffix("")
        files = {"json": Path(f"{base}.sensitivity.json"), "md": Path(f"{base}.sensitivity.md"),
                 "png": Path(f"{base}.sensitivity.png")}
        doc = {k: v for k, v in found.items() if k != "speed"}
        write_json(files["json"], doc)
        with atomic_path(files["md"]) as tmp:
            tmp.write_text(sens.markdown(found, src.name))
        with atomic_path(files["png"]) as tmp:
            sens.plot(found, tmp, src.name)
        found["sensitivity_files"] = {k: str(v) for k, v in files.items()}
    return found


def _check_channels(info, io, name) -> None:
    c = io["input_shape"][1] if len(io["input_shape"]) > 1 else None
    if isinstance(c, int) and info.input_shape[0] != c:
        raise UsageError(f"dataset {name} has {info.input_shape[0]}-channel images but the model takes {c} "
                         "channels; pass the model's own --data")


def _record(src: Path, out: Path, side: dict, precision: str, details: dict, io: dict) -> dict[str, Any]:
    record = {k: v for k, v in side.items() if k not in ("parity", "output", "command", "simplify", "checker",
                                                          "onnx_sha256", "size_mib")}
    record.update({"command": "quantize", "output": str(out), "precision": precision, "source_onnx": str(src),
                   "source_onnx_relative": _relative(src, out.parent),  # found again when both files move
                   "source_onnx_sha256": sha256(src), "source_precision": "fp32", "input_name": io["input_name"],
                   "output_name": io["output_name"], "input_shape": io["input_shape"],
                   "dynamic_batch": io["dynamic_batch"], "opset": io["opset"], "input_dtype": "float32",
                   "quantization": details, "deploycomp": __version__})
    return record


def _relative(path: Path, start: Path) -> str | None:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return None


def _random_parity(src: Path, dst: Path, io: dict) -> dict[str, Any]:
    """Max |diff| of the converted model's logits against the FP32 model's, on N(0, 1) inputs (None for a
    graph with several outputs, a detector after NMS: which boxes survive random inputs means nothing)."""
    import numpy as np

    if len(ort_session(src).get_outputs()) > 1:
        return None

    shape = [d if isinstance(d, int) else 4 for d in io["input_shape"]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return compare(ort_run(ort_session(src), x), ort_run(ort_session(dst), x))


def _accuracy(src: Path, dst: Path, test, samples: int | None, name: str, seed: int, task=None) -> dict[str, Any]:
    """The task's headline metric of the converted model against the FP32 one (``top1_pct`` for
    classifiers: ``fp32_top1_pct``, ``top1_pct``, ``top1_drop_points``; ``miou_pct`` for segmentation: ...)."""
    metric = task.metric if task is not None else "top1_pct"
    label = task.label if task is not None else "top-1"
    ref = evaluate_onnx(src, test, samples, seed=seed, task=task)
    new = evaluate_onnx(dst, test, samples, seed=seed, task=task)
    if task is None:
        from deploycomp.tasks import get_task

        task = get_task("classification", 1)
    agree = task.agreement_pct(ref.pop("predictions"), new.pop("predictions"))
    stem = metric.removesuffix("_pct")
    acc = {"dataset": name, "split": "test", "samples": new["samples"], "runtime": "onnxruntime CPU",
           "metric": metric, "label": label,
           f"fp32_{metric}": ref[metric], metric: new[metric],
           f"{stem}_drop_points": ref[metric] - new[metric], "prediction_agreement_pct": agree,
           "agreement": task.agreement}
    return acc


def _agreement_words(accuracy: dict[str, Any]) -> str:
    kind = accuracy.get("agreement")
    return "of confident detections matched" if kind == "detection match" else "same predictions"


def summary_line(record: dict[str, Any]) -> str:
    parts = [f"wrote {record['output']} ({record['precision']}, {record['size_mib']:.2f} MiB, "
             f"{record['source_size_mib'] / max(record['size_mib'], 1e-9):.1f}x smaller than FP32)"]
    p = record.get("parity_vs_fp32")
    if p:
        parts.append(f"max |diff| vs FP32 on random inputs {p['max_abs_diff']:.3g}")
    a = record.get("accuracy")
    if a:
        m = a.get("metric", "top1_pct")
        parts.append(f"{a.get('label', 'top-1')} on {a['dataset']} test ({a['samples']:,} images, ORT CPU): "
                     f"{a[m]:.2f}% vs FP32 {a[f'fp32_{m}']:.2f}% "
                     f"({0.0 - a[m.removesuffix('_pct') + '_drop_points']:+.2f} points, "
                     f"{a['prediction_agreement_pct']:.2f}% {_agreement_words(a)})")
    line = "; ".join(parts)
    guard = (record.get("quantization") or {}).get("guard")
    if guard:
        from deploycomp.sensitivity import summary_lines

        line = "\n".join([line, *summary_lines(guard)])
    return line
