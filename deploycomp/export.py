"""ONNX export with the after-checks that make it trustworthy: checker, simplification, ORT parity.

``export_onnx`` writes ``model.onnx`` and ``model.onnx.json`` (the sidecar: input name and shape,
normalisation, classes, opset, source checkpoint and its hash, MACs, parity figures). Parity compares
ONNX Runtime (CPU) with PyTorch on random inputs *and* real images of the checkpoint's dataset; above
tolerance the file is kept only as ``model.FAILED-parity.onnx`` and :class:`ParityError` is raised.

Exporters are a registry: ``torchscript`` (torch's TorchScript-based exporter: fast, opsets 7-20,
no extra dependency) is the default; ``dynamo`` (``torch.export``-based, opsets 18+) needs onnxscript.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploycomp import __version__, console
from deploycomp.errors import (
    InputFileError,
    MissingDependencyError,
    ParityError,
    ResourceError,
    UsageError,
    check,
    environment_error,
    first_line,
)
from deploycomp.files import (
    atomic_path,
    cannot_write,
    check_output,
    describe_kind,
    make_dirs,
    sha256,
    sidecar_path,
    write_json,
    write_sidecar,
)
from deploycomp.registry import Registry

DEFAULT_OPSET = 17  # TensorRT 10.x (JetPack 6 included) and 11.x parse it; Q/DQ per-channel needs >= 13
INPUT_NAME, OUTPUT_NAME, BATCH_AXIS = "input", "logits", "batch"
# Parity passes when max |ORT - PyTorch| <= atol + rtol * max |PyTorch| over the logits: FP32 CPU kernels
# agree to ~1e-6 of the logits' scale, a broken export misses by the scale itself.
DEFAULT_ATOL, DEFAULT_RTOL = 1e-4, 1e-3
RANDOM_INPUTS = 8  # samples of N(0, 1) noise (already in normalised units)
REAL_INPUTS = 32  # samples of the checkpoint's dataset (test split), when its files are present
DYNAMIC_BATCHES = (1, 3, 8)  # batch sizes parity tries on a --dynamic-batch model


@dataclass(frozen=True)
class Exporter:
    name: str
    fn: Callable[..., None]  # (model, example, path, opset, dynamic_batch) -> None
    opsets: tuple[int, int]  # inclusive range the exporter can write
    requires: str | None = None  # module it needs beyond torch
    description: str = ""


EXPORTERS: Registry[Exporter] = Registry("ONNX exporter")


def register_exporter(name: str, *, opsets: tuple[int, int], requires: str | None = None, description: str = ""):
    def wrap(fn):
        EXPORTERS.register(name, Exporter(name, fn, opsets, requires, description))
        return fn

    return wrap


def _torch_opset_limits() -> dict[str, int]:
    from torch.onnx import _constants as c

    return {"min": c.ONNX_MIN_OPSET, "torchscript_max": getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20),
            "max": c.ONNX_MAX_OPSET}


@register_exporter("torchscript", opsets=(9, 20), description="torch.onnx.export(dynamo=False)")
def _export_torchscript(model, example, path: Path, opset: int, dynamic_batch: bool,
                        output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> None:
    import torch

    axes = {name: {0: BATCH_AXIS} for name in (INPUT_NAME, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated upstream; it still is the robust one
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=list(output_names), dynamic_axes=axes, do_constant_folding=True)


@register_exporter("dynamo", opsets=(18, 23), requires="onnxscript", description="torch.onnx.export(dynamo=True)")
def _export_dynamo(model, example, path: Path, opset: int, dynamic_batch: bool,
                   output_names: tuple[str, ...] = (OUTPUT_NAME,)) -> None:
    import torch

    shapes = {"x": {0: torch.export.Dim(BATCH_AXIS, min=1, max=4096)}} if dynamic_batch else None
    program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                output_names=list(output_names), dynamic_shapes=_rename_first_arg(model, shapes),
                                external_data=False)
    program.save(str(path), external_data=False)


def _rename_first_arg(model, shapes):
    """dynamic_shapes is keyed by the forward argument's name (``x`` for torchvision, anything elsewhere)."""
    if shapes is None:
        return None
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters if p != "self"]
    return {params[0]: shapes["x"]} if params else shapes


def check_tolerances(atol: float | None, rtol: float | None) -> tuple[float, float]:
    """The parity tolerances (defaults filled in); a one-line error for negative, infinite or both-zero ones."""
    import math

    atol = DEFAULT_ATOL if atol is None else atol
    rtol = DEFAULT_RTOL if rtol is None else rtol
    check(0 <= atol < math.inf and 0 <= rtol < math.inf and atol + rtol > 0,
          f"--atol/--rtol must be finite, >= 0 and not both 0, got {atol}/{rtol}")
    return atol, rtol


def resolve_exporter(name: str | None, opset: int | None) -> tuple[Exporter, int]:
    """The exporter and opset to use; a one-line error when the exporter cannot write that opset."""
    exporter = EXPORTERS.get(name or "torchscript")
    if opset is None:
        opset = DEFAULT_OPSET if exporter.name == "torchscript" else exporter.opsets[0]
    lo, hi = exporter.opsets
    if exporter.name == "torchscript":
        hi = min(hi, _torch_opset_limits()["torchscript_max"])
    else:
        hi = min(hi, _torch_opset_limits()["max"])
    if not lo <= opset <= hi:
        other = [e.name for e in map(EXPORTERS.get, EXPORTERS.names())
                 if e.name != exporter.name and e.opsets[0] <= opset <= e.opsets[1]]
        hint = f"; the {other[0]} exporter can (--exporter {other[0]})" if other else ""
        raise UsageError(f"--opset {opset} cannot be written by the {exporter.name} exporter, which supports "
                         f"opsets {lo}-{hi}{hint}")
    if exporter.requires:
        import importlib.util

        if importlib.util.find_spec(exporter.requires) is None:
            raise MissingDependencyError(f"the {exporter.name} exporter needs {exporter.requires}: "
                                         f"pip install {exporter.requires}, or use --exporter torchscript")
    return exporter, opset


# --------------------------------------------------------------------------------------------------
# ONNX helpers shared by quantize, build and bundle


def load_onnx(path: str | os.PathLike, what: str = "ONNX model"):
    """Read an ONNX file, with a one-line error when it is missing, not ONNX, or its external data is unsafe."""
    import onnx

    p = check_onnx_file(path, what)
    model = _parse_onnx(p)
    if _external_tensors(model):
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as e:  # noqa: BLE001 - onnx raises its own C++ exception types
            raise InputFileError(f"{path}: its external data cannot be read ({first_line(e, 200)})") from None
    return model


def check_onnx_file(path: str | os.PathLike, what: str = "ONNX model") -> Path:
    """``path`` when it is an ONNX file whose external data (if any) lies safely beside it; else one line.

    External data is where large models keep their weights: files named by the model itself. A location
    outside the model's folder (``../../secret``, an absolute path) or a symbolic link (which could lead
    anywhere) is refused before any reader opens it, and so is a missing or truncated data file.
    """
    from deploycomp.files import require_file

    p = require_file(path, what)
    check_external_data(_parse_onnx(p), p)
    return p


def _parse_onnx(p: Path):
    import onnx
    from google.protobuf.message import DecodeError

    from deploycomp.files import wrong_kind

    hint = "give the .onnx file written by `deploycomp export`"
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError, TypeError, IndexError) as e:
        kind = describe_kind(p)
        if kind in (None, "an ONNX model"):
            raise InputFileError(f"{p} is not a readable ONNX model: it is truncated, damaged or of another kind "
                                 f"({type(e).__name__}); {hint}") from None
        raise wrong_kind(p, "an ONNX model", hint if not kind.startswith("a ZIP") else
                         "export the checkpoint first: deploycomp export --model FILE") from None
    if not model.graph.node:
        raise InputFileError(f"{p} is not an ONNX model (no graph in it); {hint}")
    return model


def _external_tensors(model) -> list:
    """Every tensor of ``model`` (initializers and attributes, subgraphs included) stored in external data."""
    import onnx

    found = []

    def graph(g):
        found.extend(t for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        for node in g.node:
            for a in node.attribute:
                tensors = ([a.t] if a.HasField("t") else []) + list(a.tensors)
                found.extend(t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL)
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    graph(sub)

    graph(model.graph)
    return found


def check_external_data(model, path: str | os.PathLike) -> None:
    """Refuse external data outside the folder of the model at ``path``, missing, or shorter than declared."""
    folder = Path(os.path.realpath(Path(path).parent))
    for t in _external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{path}: tensor {t.name!r} keeps its data in {loc!r}"
        if not loc or os.path.isabs(loc) or Path(loc).drive:
            raise InputFileError(f"{where}, which is not a path relative to the model; refusing to read it "
                                 "(external data must lie in the model's folder)")
        target = Path(path).parent / loc
        if target.is_symlink():
            raise InputFileError(f"{where}, which is a symbolic link; refusing to follow it (external data must be "
                                 "a plain file in the model's folder)")
        real = Path(os.path.realpath(target))
        if real != folder and folder not in real.parents:
            raise InputFileError(f"{where}, which leads outside the model's folder {folder}; refusing to read it "
                                 "(external data must lie in the model's folder)")
        if not real.is_file():
            raise InputFileError(f"{where}, which does not exist; copy it beside the model")
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise InputFileError(f"{where} with a damaged offset/length") from None
        if end > real.stat().st_size:
            raise InputFileError(f"{where}, which is shorter ({real.stat().st_size} bytes) than the model says "
                                 f"({end}); it is truncated")


def require_onnx_path(path: str | os.PathLike) -> Path:
    """Check that ``path`` exists and is ONNX (cheaply: protobuf parse of the header graph)."""
    load_onnx(path)
    return Path(path)


def io_info(model) -> dict[str, Any]:
    """Input/output names, shapes (None for a symbolic axis), dtype names and whether batch is dynamic."""
    import onnx

    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    check(len(inputs) == 1, f"expected one model input, found {len(inputs)}: deploycomp handles image classifiers",
          InputFileError)

    def shape(value_info):
        dims = value_info.type.tensor_type.shape.dim
        return [d.dim_value if d.HasField("dim_value") else None for d in dims]

    def dtype(value_info):
        return onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name

    x, y = inputs[0], model.graph.output[0]
    in_shape = shape(x)
    return {"input_name": x.name, "output_name": y.name, "input_shape": in_shape, "output_shape": shape(y),
            "input_dtype": dtype(x), "output_dtype": dtype(y),
            "dynamic_batch": bool(in_shape) and in_shape[0] is None, "opset": _opset(model)}


def _opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def onnx_precision(model) -> str:
    """What precision the graph itself carries: ``int8`` (Q/DQ nodes), ``fp16`` (FP16 weights) or ``fp32``."""
    import onnx

    ops = {n.op_type for n in model.graph.node}
    if {"QuantizeLinear", "DequantizeLinear"} & ops or {"QLinearConv", "QLinearMatMul"} & ops:
        return "int8"
    float_inits = [i.data_type for i in model.graph.initializer
                   if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    if float_inits and float_inits.count(onnx.TensorProto.FLOAT16) * 2 >= len(float_inits):
        return "fp16"
    return "fp32"


def ort_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session (the reference runtime for every check in this module)."""
    import onnxruntime as ort

    check_onnx_file(path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise InputFileError(f"ONNX Runtime cannot load {path}: {first_line(e)}") from None


def ort_run(session, x):
    """Run ``session`` on a torch tensor or numpy array (cast to the model's input dtype); its first output,
    numpy float32."""
    import numpy as np

    return ort_run_all(session, x)[0].astype(np.float32)


def ort_run_all(session, x) -> list:
    """Every output of ``session`` on ``x`` (numpy, in graph order; floating outputs as float32)."""
    import numpy as np

    inp = session.get_inputs()[0]
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    arr = arr.astype(np.float16 if inp.type == "tensor(float16)" else np.float32, copy=False)
    return [o.astype(np.float32) if np.issubdtype(o.dtype, np.floating) else o
            for o in session.run(None, {inp.name: arr})]


def ort_batch(session) -> int | None:
    """The fixed batch size of a session's input, or None when the batch axis is dynamic."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


# --------------------------------------------------------------------------------------------------
# Parity


def compare(ref, out) -> dict[str, float]:
    """Max/mean absolute difference and argmax agreement over the class axis of two arrays: (N, classes)
    logits (``top1_agreement_pct``, over images) or (N, classes, H, W) maps (over pixels)."""
    import numpy as np

    ref, out = np.asarray(ref), np.asarray(out)
    diff = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    agree = ref.argmax(1) == out.argmax(1)
    return {"max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "top1_agreement_pct": 100.0 * float(agree.mean()) if agree.size else 100.0,
            "agreement": {4: "pixel", 3: "argmax"}.get(ref.ndim, "top-1"),
            "samples": int(ref.shape[0]) if ref.ndim else 0}


def _chunks(x, batch: int | None):
    """Split (N, ...) into pieces the model accepts: exactly ``batch`` rows when it is static."""
    if batch is None:
        return [x]
    n = (x.shape[0] // batch) * batch
    return [x[i:i + batch] for i in range(0, n, batch)]


def parity_inputs(ckpt, shape: tuple[int, ...], *, data: str | None = None, data_dir=None,
                  dynamic_batch: bool = False, seed: int = 0, dataset=None) -> dict[str, list]:
    """Random and (when the dataset is present) real inputs, grouped into the batches the model takes."""
    import torch

    batch = None if dynamic_batch else shape[0]
    g = torch.Generator().manual_seed(seed)
    n = max(RANDOM_INPUTS, batch or 0)
    n = (n + (batch or 1) - 1) // (batch or 1) * (batch or 1)
    noise = torch.randn(n, *shape[1:], generator=g)
    groups: dict[str, list] = {}
    if dynamic_batch:
        groups["random"] = [torch.randn(b, *shape[1:], generator=g) for b in DYNAMIC_BATCHES]
    else:
        groups["random"] = _chunks(noise, batch)
    real = _real_images(ckpt, shape[1:], data, data_dir, max(REAL_INPUTS, batch or 0), dataset)
    if real is not None:
        groups["real"] = _chunks(real, batch)
    return groups


def _real_images(ckpt, chw: tuple[int, ...], data: str | None, data_dir, n: int, dataset=None):
    from deploycomp.data import calibration_batches, load_dataset
    from deploycomp.errors import DeploycompError

    name = data or ckpt.metadata.get("dataset")
    if dataset is None:
        if not name:
            console.info("parity: no dataset known for this model; checking on random inputs only")
            return None
        try:
            dataset, _ = load_dataset(name, "test", data_dir, input_size=tuple(chw[1:]))
        except DeploycompError as e:
            console.warn(f"parity on real inputs skipped: {e}")
            return None
    n = min(n, len(dataset))
    x = calibration_batches(dataset, n, n, seed=1)[0][0]
    if tuple(x.shape[1:]) != tuple(chw):
        console.warn(f"parity on real inputs skipped: dataset {name} yields {tuple(x.shape[1:])} images, "
                     f"the model takes {tuple(chw)}")
        return None
    return x


def check_parity(model, onnx_path: str | os.PathLike, groups: dict[str, list], atol: float = DEFAULT_ATOL,
                 rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime (CPU) on every group of inputs; passes when max_abs_diff <= tolerance."""
    import numpy as np
    import torch

    session = ort_session(onnx_path)
    report: dict[str, Any] = {"runtime": "onnxruntime CPU", "atol": atol, "rtol": rtol}
    all_ref, all_out = [], []
    for kind, batches in groups.items():
        with torch.no_grad():  # one PyTorch pass over the group: eval-mode outputs do not depend on the batch
            ref = model(torch.cat(batches)).float().numpy()
        out = np.concatenate([ort_run(session, x) for x in batches])
        refs, outs = [ref], [out]
        report[kind] = compare(ref, out)
        report[kind]["batch_sizes"] = sorted({int(x.shape[0]) for x in batches})
        all_ref += refs
        all_out += outs
    report.update(compare(np.concatenate(all_ref), np.concatenate(all_out)))
    report["max_abs_logit"] = float(np.abs(np.concatenate(all_ref)).max())
    report["tolerance"] = atol + rtol * report["max_abs_logit"]
    report["passed"] = bool(report["max_abs_diff"] <= report["tolerance"])
    return report


def parity_line(report: dict[str, Any]) -> str:
    def of(entry) -> str:
        return f" ({entry['diff_of']})" if entry.get("diff_of") else ""

    parts = [f"{kind}: max |diff| {report[kind]['max_abs_diff']:.2e}{of(report[kind])}, "
             f"{report[kind].get('agreement', 'top-1')} agreement {report[kind]['top1_agreement_pct']:.1f}% "
             f"({report[kind]['samples']} samples)" for kind in ("random", "real") if kind in report]
    return "parity vs PyTorch (ONNX Runtime CPU) " + "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Export


def failed_path(output: str | os.PathLike, reason: str) -> Path:
    """``model.onnx`` -> ``model.FAILED-<reason>.onnx``: a name nobody mistakes for a good model."""
    p = Path(output)
    return p.with_name(f"{p.stem}.FAILED-{reason}{p.suffix or '.onnx'}")


def simplify_onnx(path: Path) -> dict[str, Any]:
    """Simplify in place with onnxslim (constant folding, dead-node and redundant-op removal)."""
    import onnx
    import onnxslim

    before = onnx.load(str(path))
    n_before = len(before.graph.node)
    try:
        slim = onnxslim.slim(before)
    except Exception as e:  # onnxslim raises whatever its passes raise; the unsimplified model is still fine
        console.warn(f"onnxslim failed ({type(e).__name__}: {str(e)[:200]}); keeping the unsimplified graph")
        return {"simplified": False, "nodes": n_before}
    onnx.save(slim, str(path))
    return {"simplified": True, "nodes_before": n_before, "nodes": len(slim.graph.node)}


def export_onnx(ckpt, output: str | os.PathLike, *, opset: int | None = None, batch: int = 1,
                dynamic_batch: bool = False, input_size: tuple[int, int] | None = None, simplify: bool = True,
                parity: bool = True, data: str | None = None, data_dir: str | os.PathLike | None = None,
                atol: float | None = None, rtol: float | None = None, exporter: str | None = None,
                dataset=None, raw: bool = False, postprocess: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``ckpt`` (a :class:`~deploycomp.checkpoint.Checkpoint`) to ONNX at ``output``.

    Writes the model and its sidecar atomically, after the ONNX checker and (``parity``) the ORT-vs-PyTorch
    check have passed; on a failed check the model is kept as ``*.FAILED-<check>.onnx`` and the error raised.
    ``parity=False`` only skips the comparison, never the checker (the CLI always runs both).
    ``dataset`` (a loaded test split) saves reloading ``data`` for the real parity inputs.
    Detectors: ``postprocess`` sets ``max_det``, ``score_threshold``, ``iou_threshold`` of the exported
    NMS; ``raw`` exports the head alone. Returns the sidecar record.
    """
    import onnx
    import torch

    from deploycomp.metrics import count_macs, count_params
    from deploycomp.resources import check_forward_fits

    check(batch >= 1, f"--batch must be positive, got {batch}")
    check(not (dynamic_batch and batch != 1), "--batch and --dynamic-batch exclude each other: a dynamic-batch "
          "model takes any batch size")
    atol, rtol = check_tolerances(atol, rtol)
    output = Path(output)
    check(output.suffix == ".onnx", f"output {output} should end in .onnx")
    check_output(output, ckpt.source)
    exp, opset = resolve_exporter(exporter, opset)

    chw = tuple(ckpt.input_shape)
    if input_size is not None:
        chw = (chw[0], *input_size)
    shape = (batch, *chw)
    from deploycomp.tasks import get_task, task_of_checkpoint

    task = get_task(task_of_checkpoint(ckpt), ckpt.num_classes or 1)
    check(not postprocess or task.name == "detection", "--max-detections, --score-threshold and --iou-threshold "
          f"set a detector's post-processing; {ckpt.source or ckpt.arch} is a {task.name} model: drop them")
    for key, value in (postprocess or {}).items():
        setattr(task, key, value)
    model = ckpt.model.eval().cpu()
    module, output_names = task.export_module(model, raw, exp.name)
    check(not dynamic_batch or getattr(model, "exports_dynamic_batch", True),
          f"{ckpt.source or ckpt.arch} cannot export with --dynamic-batch: its post-processing loops over the images "
          "of a batch (torchvision's), so the graph holds one batch size; export with --batch N instead")
    check_forward_fits(model, chw, batch, "--batch or --input-size")
    example = torch.randn(*shape)
    params = count_params(model)
    macs = count_macs(model, torch.zeros(1, *chw))
    meta = ckpt.metadata
    record: dict[str, Any] = {
        "command": "export", "output": str(output), "format": "onnx", "precision": "fp32",
        "input_name": INPUT_NAME, "output_name": output_names[0],
        "output_names": list(output_names),
        "input_shape": [None if dynamic_batch else batch, *chw], "dynamic_batch": dynamic_batch,
        "layout": "NCHW", "input_dtype": "float32", "opset": opset, "exporter": exp.name,
        "mean": meta.get("mean"), "std": meta.get("std"), "class_names": meta.get("class_names"),
        "num_classes": ckpt.num_classes, "dataset": data or meta.get("dataset"), "task": task.name,
        **task.export_record(raw),
        "arch": ckpt.arch, "model_kwargs": ckpt.model_kwargs, "surgeries": [s["op"] for s in ckpt.surgeries],
        "source": ckpt.source, "source_sha256": sha256(ckpt.source) if ckpt.source else None,
        "macs": macs, "macs_g": macs / 1e9, "flops_g": 2 * macs / 1e9, **params,
        "deploycomp": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
    }

    make_dirs(output.parent)
    try:
        workspace = tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent)
    except OSError as e:
        raise cannot_write(output, e) from None
    with workspace as work:
        tmp = Path(work) / output.name
        with console.status_line(f"exporting {ckpt.source or ckpt.arch} to ONNX (opset {opset}, {exp.name})"):
            try:
                with console.captured_output():  # graph dumps and exporter chatter: only -v shows them
                    exp.fn(module, example, tmp, opset, dynamic_batch, output_names)
            except OSError as e:  # the disk, not the exporter
                raise cannot_write(output, e) from None
            except Exception as e:  # exporter failures are many and varied; name the model and the cause
                if isinstance(environment_error(e), ResourceError):
                    raise  # out of memory: the CLI says so in one line
                cause = first_line(e, 300).split(" Please feel free")[0].rstrip(". ")  # torch's plea to file an issue
                raise UsageError(f"the {exp.name} exporter cannot export {ckpt.source or ckpt.arch} at opset {opset} "
                                 f"and input {chw[1]}x{chw[2]}: {cause}; "
                                 f"{_export_hint(e, exp.name, chw)}") from None
        record["simplify"] = simplify_onnx(tmp) if simplify else {"simplified": False}
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
            record["checker"] = "passed"
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            record["checker"] = f"failed: {first_line(e)}"
            _keep_failed(tmp, output, "check", record)
            raise ParityError(f"the ONNX checker rejects the exported model ({record['checker'][8:]}); kept as "
                              f"{failed_path(output, 'check')}") from None
        if parity:
            groups = parity_inputs(ckpt, shape, data=data, data_dir=data_dir, dynamic_batch=dynamic_batch,
                                   dataset=dataset)
            report = task.check_parity(module, tmp, groups, atol, rtol)
            record["parity"] = report
            console.info(parity_line(report))
            if not report["passed"]:
                _keep_failed(tmp, output, "parity", record)
                raise ParityError(
                    f"{report['failure']}; the model was kept only as {failed_path(output, 'parity')} for "
                    "inspection" if "failure" in report else
                    f"ONNX Runtime disagrees with PyTorch: max |diff| {report['max_abs_diff']:.3g} > tolerance "
                    f"{report['tolerance']:.3g} (atol {atol:g} + rtol {rtol:g} x max |logit| "
                    f"{report['max_abs_logit']:.3g}; "
                    f"{report.get('agreement', 'top-1')} agreement {report['top1_agreement_pct']:.1f}%); the model "
                    "was kept only as "
                    f"{failed_path(output, 'parity')} for inspection")
        else:
            record["parity"] = None
        with atomic_path(output) as final:
            os.replace(tmp, final)
    record["onnx_sha256"] = sha256(output)
    record["size_mib"] = output.stat().st_size / 2**20
    write_sidecar(output, record)
    return record


def _export_hint(e: BaseException, exporter: str, chw: tuple[int, ...]) -> str:
    """The nearest workaround for an exporter failure."""
    other = "--exporter dynamo (pip install onnxscript)" if exporter != "dynamo" else "--exporter torchscript"
    if "adaptive" in str(e) and "factor" in str(e):
        return (f"ONNX pools adaptively only when the output size divides the feature map: use a larger --input-size "
                f"(the model's native one, e.g. 224, where {chw[1]}x{chw[2]} is too small), or {other}")
    return f"try {other}, another --opset, or -v for the exporter's own output"


def _keep_failed(tmp: Path, output: Path, reason: str, record: dict[str, Any]) -> None:
    bad = failed_path(output, reason)
    os.replace(tmp, bad)
    write_json(sidecar_path(bad), {**record, "output": str(bad), "failed": reason})


def read_sidecar(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of an ONNX file written by deploycomp ({} when there is none)."""
    from deploycomp.files import read_json

    side = sidecar_path(onnx_path)
    return read_json(side) if side.exists() else {}
