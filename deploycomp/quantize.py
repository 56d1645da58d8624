"""ONNX precision: FP16 conversion and INT8 static post-training quantization in Q/DQ form.

Precision lives in the ONNX graph (see ARCHITECTURE.md, "Precision and TensorRT"): TensorRT 11 is
strongly typed and takes its precision from the graph, TensorRT 10 builds it as well, and ONNX Runtime
runs it on any CPU, so the accuracy of the converted model is measured here, before any engine exists.

* ``fp16``: onnxconverter-common's ``convert_float_to_float16`` with ``keep_io_types`` (the model
  still takes and returns FP32, so preprocessing does not change).
* ``int8``: onnxruntime.quantization's ``quantize_static`` in ``QuantFormat.QDQ``: symmetric INT8
  activations and per-channel symmetric INT8 weights (zero points 0), what TensorRT's explicit
  quantization consumes. Calibration images come from the dataset's *training* split through
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


@dataclass
class QuantizeOptions:
    dataset: Any = None  # calibration split (torch Dataset), int8 only
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_batch: int = DEFAULT_CALIB_BATCH
    calib_method: str = "minmax"  # a name in CALIBRATION_METHODS
    model_batch: int | None = None  # the ONNX input's fixed batch (None: dynamic)
    input_name: str = "input"
    seed: int = 0
    quantize_all_layers: bool = False  # False: the first convolution and the classifier stay in float


@register_precision("fp16", needs_data=False, description="FP16 weights and compute, FP32 inputs/outputs")
def _to_fp16(src: Path, dst: Path, opts: QuantizeOptions) -> dict[str, Any]:
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per weight clipped to the FP16 range; summarised below
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))
    return {"converter": "onnxconverter-common float16.convert_float_to_float16", "keep_io_types": True}


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
                    description="INT8 Q/DQ: symmetric activations, per-channel symmetric weights (TensorRT explicit)")
def _to_int8(src: Path, dst: Path, opts: QuantizeOptions) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from deploycomp.data import calibration_batches

    method = CALIBRATION_METHODS.get(opts.calib_method)
    batch = opts.model_batch or opts.calib_batch
    samples = max(batch, opts.calib_samples // batch * batch)  # whole batches of the size the model takes
    batches = [x.numpy() for x, _ in calibration_batches(opts.dataset, samples, batch, seed=opts.seed)]
    console.info(f"calibrating INT8 ({opts.calib_method}) on {samples} images in {len(batches)} batches")
    with tempfile.TemporaryDirectory() as work:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        float_nodes = [] if opts.quantize_all_layers else _first_and_last_layers(pre)
        # Zero points 0 everywhere and FP32 bias: TensorRT's DequantizeLinear takes INT8, not INT32, inputs.
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
        if opts.calib_method == "percentile":
            extra["CalibPercentile"] = PERCENTILE
        chatter = io.StringIO()  # the histogram calibrators print() their progress; stdout is for results
        reader, cache = _CalibrationReader(batches, opts.input_name), None
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            if method != "MinMax":
                # quantize_static does not pass histogram sizes on, and with its default 128 bins the entropy
                # search has a single candidate (the min/max range): collect the ranges here with TensorRT's
                # classic 2048 histogram bins and hand them over as a calibration cache.
                cache = Path(work) / "ranges.json"
                _histogram_ranges(pre, Path(work), method, reader, cache)
                reader = None
            quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, method), extra_options=extra,
                            calibration_cache_path=cache, nodes_to_exclude=float_nodes)
        for line in chatter.getvalue().splitlines():
            console.debug(line)
    return {"quantizer": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "activations": "int8 symmetric", "weights": "int8 symmetric per-channel", "bias": "fp32",
            "calib_method": opts.calib_method, "calib_samples": samples, "calib_batch": batch,
            "calib_split": "train", "calib_seed": opts.seed, "float_nodes": float_nodes,
            **({"calib_histogram_bins": 2048} if opts.calib_method != "minmax" else {}),
            **({"calib_percentile": PERCENTILE} if opts.calib_method == "percentile" else {})}


def _first_and_last_layers(model_path: Path) -> list[str]:
    """Names of the first convolution and the last Gemm/MatMul (the classifier).

    These two layers are the most sensitive to 8-bit rounding (the raw input and the logits); keeping
    them in float is standard practice and costs almost nothing. On the shipped Fashion-MNIST baseline
    it turns a 2.7-point INT8 top-1 loss into less than 0.2 points (minmax, 512 calibration images).
    TensorRT runs the unquantized layers in FP16/FP32 within the same engine.
    """
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return convs[:1] + heads[-1:]


def _histogram_ranges(model: Path, work: Path, method: str, reader, cache: Path) -> None:
    """Activation ranges from an entropy/percentile histogram calibration, saved as an ORT calibration cache."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    options = {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128, "percentile": PERCENTILE}
    calibrator = create_calibrator(model, sorted(set(QDQRegistry) | set(QLinearOpsRegistry)),
                                   augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, method), extra_options=options)
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


# --------------------------------------------------------------------------------------------------


def default_output(onnx_path: str | os.PathLike, precision: str) -> Path:
    """``model.onnx`` -> ``model.fp16.onnx`` / ``model.int8.onnx``."""
    p = Path(onnx_path)
    return p.with_name(f"{p.stem}.{precision}.onnx")


def evaluate_onnx(path: str | os.PathLike, dataset, samples: int | None = None, batch_size: int = 256,
                  seed: int = 0) -> dict[str, Any]:
    """Top-1 of an ONNX model on ``dataset`` with ONNX Runtime CPU; also returns the predictions."""
    import numpy as np
    import torch

    from deploycomp.data import make_loader, subset

    session = ort_session(path)
    fixed = ort_batch(session)
    data = subset(dataset, samples, seed=seed)
    preds, labels = [], []
    for x, y in console.progress(make_loader(data, batch_size), total=None, description=f"ORT {Path(path).name}"):
        if fixed is not None:  # a static-batch model: feed it pieces of its own batch size
            n = x.shape[0] // fixed * fixed
            x, y = x[:n], y[:n]
            if n == 0:
                continue
            out = np.concatenate([ort_run(session, x[i:i + fixed]) for i in range(0, n, fixed)])
        else:
            out = ort_run(session, x)
        preds.append(out.argmax(1))
        labels.append(torch.as_tensor(y).numpy())
    preds_a, labels_a = np.concatenate(preds), np.concatenate(labels)
    return {"top1_pct": 100.0 * float((preds_a == labels_a).mean()), "samples": int(labels_a.size),
            "predictions": preds_a}


def quantize_onnx(onnx_path: str | os.PathLike, output: str | os.PathLike | None = None, *, precision: str,
                  data: str | None = None, data_dir: str | os.PathLike | None = None,
                  calib_samples: int | None = None, calib_batch: int | None = None, calib_method: str | None = None,
                  eval_samples: int | None = None, evaluate: bool = True, seed: int = 0,
                  quantize_all_layers: bool = False) -> dict[str, Any]:
    """Convert an FP32 ONNX model to ``precision`` (``fp16`` or ``int8``) and measure what it costs.

    The dataset is ``data`` or the one named in the ONNX sidecar (written by ``deploycomp export``).
    INT8 needs it for calibration; for both precisions it gives the top-1 of the converted model against
    the FP32 one (ONNX Runtime CPU, ``eval_samples`` test images, default all). Returns the sidecar record.
    """
    import onnx

    spec = PRECISIONS.get(precision)
    calib_method = calib_method or "minmax"
    CALIBRATION_METHODS.get(calib_method)
    src = Path(onnx_path)
    model = load_onnx(src)
    found = onnx_precision(model)
    check(found == "fp32", f"{src} is already {found}; quantize starts from the FP32 model written by "
          "`deploycomp export`")
    io = io_info(model)
    out = Path(output) if output else default_output(src, precision)
    check(out.suffix == ".onnx", f"output {out} should end in .onnx")
    check_output(out, src)
    side = read_sidecar(src)
    name = data or side.get("dataset")
    opts = QuantizeOptions(calib_samples=calib_samples or DEFAULT_CALIB_SAMPLES,
                           calib_batch=calib_batch or DEFAULT_CALIB_BATCH, calib_method=calib_method,
                           model_batch=None if io["dynamic_batch"] else io["input_shape"][0],
                           input_name=io["input_name"], seed=seed, quantize_all_layers=quantize_all_layers)
    check(opts.calib_samples > 0, f"--calib-samples must be positive, got {opts.calib_samples}")
    check(opts.calib_batch > 0, f"--calib-batch must be positive, got {opts.calib_batch}")
    check(eval_samples is None or eval_samples > 0, f"--eval-samples must be positive, got {eval_samples}")
    if spec.needs_data and not name:
        raise UsageError(f"INT8 calibration needs data: {src} has no sidecar naming its dataset; pass --data NAME "
                         "(and --data-dir DIR), e.g. --data fashion-mnist")
    test = None
    if name:
        from deploycomp.data import load_dataset

        hw = tuple(io["input_shape"][2:])
        hw = hw if all(isinstance(d, int) for d in hw) and len(hw) == 2 else None
        if spec.needs_data:
            opts.dataset, info = load_dataset(name, "train", data_dir, input_size=hw)
            _check_channels(info, io, name)
            if info.synthetic:
                console.warn(f"calibrating on synthetic data ({name}): the INT8 scales and accuracy mean nothing")
        if evaluate:
            test, info = load_dataset(name, "test", data_dir, input_size=hw)
            _check_channels(info, io, name)

    with atomic_path(out) as tmp:
        with console.status_line(f"converting {src} to {precision}"):
            details = spec.convert(src, tmp, opts)
        onnx.checker.check_model(str(tmp))
        record = _record(src, out, side, precision, details, io)
        record["parity_vs_fp32"] = _random_parity(src, tmp, io)
        if test is not None:
            record["accuracy"] = _accuracy(src, tmp, test, eval_samples, name, seed)
    record["onnx_sha256"] = sha256(out)
    record["size_mib"] = out.stat().st_size / 2**20
    record["source_size_mib"] = src.stat().st_size / 2**20
    write_sidecar(out, record)
    return record


def _check_channels(info, io, name) -> None:
    c = io["input_shape"][1] if len(io["input_shape"]) > 1 else None
    if isinstance(c, int) and info.input_shape[0] != c:
        raise UsageError(f"dataset {name} has {info.input_shape[0]}-channel images but the model takes {c} "
                         "channels; pass the model's own --data")


def _record(src: Path, out: Path, side: dict, precision: str, details: dict, io: dict) -> dict[str, Any]:
    record = {k: v for k, v in side.items() if k not in ("parity", "output", "command", "simplify", "checker",
                                                          "onnx_sha256", "size_mib")}
    record.update({"command": "quantize", "output": str(out), "precision": precision, "source_onnx": str(src),
                   "source_onnx_sha256": sha256(src), "input_name": io["input_name"],
                   "output_name": io["output_name"], "input_shape": io["input_shape"],
                   "dynamic_batch": io["dynamic_batch"], "opset": io["opset"], "input_dtype": "float32",
                   "quantization": details, "deploycomp": __version__})
    return record


def _random_parity(src: Path, dst: Path, io: dict) -> dict[str, Any]:
    """Max |diff| of the converted model's logits against the FP32 model's, on N(0, 1) inputs."""
    import numpy as np

    shape = [d if isinstance(d, int) else 4 for d in io["input_shape"]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return compare(ort_run(ort_session(src), x), ort_run(ort_session(dst), x))


def _accuracy(src: Path, dst: Path, test, samples: int | None, name: str, seed: int) -> dict[str, Any]:
    ref = evaluate_onnx(src, test, samples, seed=seed)
    new = evaluate_onnx(dst, test, samples, seed=seed)
    agree = 100.0 * float((ref.pop("predictions") == new.pop("predictions")).mean())
    acc = {"dataset": name, "split": "test", "samples": new["samples"], "runtime": "onnxruntime CPU",
           "fp32_top1_pct": ref["top1_pct"], "top1_pct": new["top1_pct"],
           "top1_drop_points": ref["top1_pct"] - new["top1_pct"], "prediction_agreement_pct": agree}
    return acc


def summary_line(record: dict[str, Any]) -> str:
    parts = [f"wrote {record['output']} ({record['precision']}, {record['size_mib']:.2f} MiB, "
             f"{record['source_size_mib'] / max(record['size_mib'], 1e-9):.1f}x smaller than FP32)"]
    p = record.get("parity_vs_fp32")
    if p:
        parts.append(f"max |diff| vs FP32 on random inputs {p['max_abs_diff']:.3g}")
    a = record.get("accuracy")
    if a:
        parts.append(f"top-1 on {a['dataset']} test ({a['samples']:,} images, ORT CPU): {a['top1_pct']:.2f}% vs FP32 "
                     f"{a['fp32_top1_pct']:.2f}% ({-a['top1_drop_points']:+.2f} points, "
                     f"{a['prediction_agreement_pct']:.2f}% same predictions)")
    return "; ".join(parts)
