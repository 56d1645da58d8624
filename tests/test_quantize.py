"""ONNX precision: FP16 closeness, INT8 Q/DQ structure (what TensorRT's explicit quantization takes),
INT8 accuracy of the shipped baseline on Fashion-MNIST, and one-line errors."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deploycomp import console
from deploycomp.checkpoint import BASELINE, load_model
from deploycomp.export import export_onnx, load_onnx, onnx_precision, ort_run, ort_session
from deploycomp.files import sha256, sidecar_path
from deploycomp.quantize import quantize_onnx
from tests.conftest import assert_one_line_error, needs_fmnist

pytestmark = needs_fmnist


@pytest.fixture(autouse=True)
def _quiet(quiet_console):
    """Progress lines off for every test here (conftest.quiet_console)."""


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    """A dynamic-batch FP32 export of light_resnet18 with Fashion-MNIST metadata (untrained: structure only)."""
    from deploycomp.data import FASHION_MNIST_CLASSES

    console.set_verbosity(console.QUIET)
    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1)
    ckpt.metadata.update({"dataset": "fashion-mnist", "input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353],
                          "class_names": FASHION_MNIST_CLASSES})
    out = tmp_path_factory.mktemp("q") / "model.onnx"
    export_onnx(ckpt, out, dynamic_batch=True, simplify=False)
    return out


def test_fp16_runs_in_ort_close_to_fp32(fp32_onnx, tmp_path):
    out = tmp_path / "m.fp16.onnx"
    rec = quantize_onnx(fp32_onnx, out, precision="fp16", eval_samples=256)
    model = load_onnx(out)
    assert onnx_precision(model) == "fp16" and rec["precision"] == "fp16"
    session = ort_session(out)
    assert session.get_inputs()[0].type == "tensor(float)"  # keep_io_types: FP32 in, FP32 out
    x = np.random.default_rng(1).standard_normal((8, 1, 28, 28)).astype(np.float32)
    ref, got = ort_run(ort_session(fp32_onnx), x), ort_run(session, x)
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    acc = rec["accuracy"]
    assert acc["samples"] == 256 and acc["prediction_agreement_pct"] >= 95.0
    assert rec["size_mib"] < 0.6 * rec["source_size_mib"]


class Graph:
    """An ONNX graph with its initializers as arrays and its producer/consumer maps (for structure checks)."""

    def __init__(self, path):
        from onnx import numpy_helper

        self.model = load_onnx(path)
        self.nodes = list(self.model.graph.node)
        self.inits = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def of(self, op: str) -> list:
        return [n for n in self.nodes if n.op_type == op]

    def made_by(self, tensor: str) -> str | None:
        n = self.producer.get(tensor)
        return n.op_type if n is not None else None

    def zero_points(self, op: str) -> list:
        return [self.inits[n.input[2]] for n in self.of(op) if len(n.input) > 2]

    def weight_scales(self) -> list:
        return [self.inits[n.input[1]] for n in self.of("DequantizeLinear")
                if n.input[0] in self.inits and self.inits[n.input[0]].ndim == 4]


def _ops_after_ort_fusion(path, tmp_path) -> Counter:
    """Operator counts of the graph ONNX Runtime's CPU provider actually runs (after its Q/DQ fusions)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "ort-optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in load_onnx(tmp_path / "ort-optimized.onnx").graph.node)


def test_int8_tensorrt_target_is_symmetric_with_qdq_placed_for_fusion(fp32_onnx, tmp_path):
    out = tmp_path / "m.int8-tensorrt.onnx"
    rec = quantize_onnx(fp32_onnx, out, precision="int8", calib_samples=64, evaluate=False, target="tensorrt")
    g = Graph(out)
    assert onnx_precision(g.model) == "int8" and not any(n.op_type.startswith("QLinear") for n in g.nodes)
    zero_points = g.zero_points("QuantizeLinear") + g.zero_points("DequantizeLinear")
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric INT8 only
    assert all(s.ndim == 1 and s.size > 1 for s in g.weight_scales())  # per-channel weights
    convs = g.of("Conv")
    first, quantized = convs[0], convs[1:]
    assert g.made_by(first.input[0]) is None and g.made_by(first.input[1]) is None  # the stem stays in float
    for conv in quantized:  # inputs of weighted layers quantized; FP32 bias; no Q/DQ on the output
        assert g.made_by(conv.input[0]) == g.made_by(conv.input[1]) == "DequantizeLinear"
        assert g.inits[conv.input[2]].dtype == np.float32
        assert all(c.op_type != "QuantizeLinear" for c in g.consumers[conv.output[0]])
    adds = g.of("Add")
    assert len(adds) == 8  # one residual add per BasicBlock: each fed straight by its block's last Conv
    for add in adds:
        sources = sorted(g.made_by(i) for i in add.input)
        assert sources in (["Conv", "DequantizeLinear"], ["Conv", "Conv"])  # identity skip: INT8 via DQ
    assert sum(sorted(g.made_by(i) for i in a.input) == ["Conv", "DequantizeLinear"] for a in adds) == 5
    gemm = g.of("Gemm")[0]
    assert g.made_by(gemm.input[0]) != "DequantizeLinear" and gemm.input[1] in g.inits  # classifier in float
    q = rec["quantization"]
    assert q["target"] == "tensorrt" and q["made_for_backends"] == ["trt"] and q["bias"] == "fp32"
    assert q["activations"] == "int8 symmetric" and q["reduce_range"] is False
    assert q["float_nodes"] == [first.name, gemm.name] and q["calib_samples"] == 64
    got = ort_run(ort_session(out), np.zeros((3, 1, 28, 28), np.float32))
    assert got.shape == (3, 10) and np.isfinite(got).all()


def test_int8_ort_cpu_target_is_u8s8_and_runs_as_integer_kernels(fp32_onnx, tmp_path):
    from deploycomp.quantize import has_vnni, reduce_range_without_vnni

    out = tmp_path / "m.int8.onnx"
    rec = quantize_onnx(fp32_onnx, out, precision="int8", calib_samples=64, evaluate=False)  # the default target
    g = Graph(out)
    activation_zps = g.zero_points("QuantizeLinear")
    assert activation_zps and all(z.dtype == np.uint8 and z.ndim == 0 for z in activation_zps)  # U8 activations
    weight_zps = [g.inits[n.input[2]] for n in g.of("DequantizeLinear") if n.input[0] in g.inits
                  and g.inits[n.input[0]].dtype == np.int8]
    assert weight_zps and all(not z.any() for z in weight_zps)  # S8 symmetric weights
    assert all(s.ndim == 1 and s.size > 1 for s in g.weight_scales())  # per-channel
    for conv in g.of("Conv"):  # every convolution quantized, the stem included; INT32 bias
        assert g.made_by(conv.input[0]) == g.made_by(conv.input[1]) == g.made_by(conv.input[2]) == "DequantizeLinear"
        bias_dq = g.producer[conv.input[2]]
        assert g.inits[bias_dq.input[0]].dtype == np.int32
    # What ONNX Runtime runs: integer kernels only, no float convolution left (why it is faster than FP32).
    ops = _ops_after_ort_fusion(out, tmp_path)
    assert ops["QLinearConv"] == len(g.of("Conv")) and ops["Conv"] == 0 and ops["QLinearAdd"] == 8
    q = rec["quantization"]
    assert q["target"] == "ort-cpu" and q["made_for_backends"] == ["ort"] and q["bias"] == "int32"
    assert q["activations"] == "uint8 asymmetric" and q["float_nodes"] == []
    assert q["reduce_range"] == reduce_range_without_vnni() and q["quantizing_cpu"]["vnni"] == has_vnni()
    side = json.loads(sidecar_path(out).read_text())
    assert side["precision"] == "int8" and side["source_onnx"] == str(fp32_onnx) and side["dataset"] == "fashion-mnist"
    assert side["source_onnx_sha256"] == sha256(fp32_onnx) and side["source_precision"] == "fp32"
    assert (out.parent / side["source_onnx_relative"]).resolve() == fp32_onnx.resolve()
    got = ort_run(ort_session(out), np.zeros((3, 1, 28, 28), np.float32))
    assert got.shape == (3, 10) and np.isfinite(got).all()


def test_tensorrt_graph_keeps_float_convolutions_in_onnx_runtime(fp32_onnx, tmp_path):
    """Why a TensorRT-shaped INT8 graph is slow on the CPU: ONNX Runtime fuses none of its convolutions."""
    out = tmp_path / "t.onnx"
    quantize_onnx(fp32_onnx, out, precision="int8", calib_samples=32, evaluate=False, target="tensorrt")
    ops = _ops_after_ort_fusion(out, tmp_path)
    assert ops["QLinearConv"] == 0 and ops["Conv"] + ops["FusedConv"] == 20


def test_default_outputs_name_the_target(fp32_onnx, tmp_path):
    from deploycomp.quantize import DEFAULT_INT8_TARGET, default_output

    assert DEFAULT_INT8_TARGET == "ort-cpu"
    assert default_output("a/m.onnx", "int8") == default_output("a/m.onnx", "int8", "ort-cpu") == Path("a/m.int8.onnx")
    assert default_output("a/m.onnx", "int8", "tensorrt") == Path("a/m.int8-tensorrt.onnx")
    assert default_output("a/m.onnx", "fp16") == Path("a/m.fp16.onnx")


def test_fp32_source_is_found_after_moving_both_files(fp32_onnx, tmp_path):
    from deploycomp.quantize import fp32_source

    out = tmp_path / "a" / "m.int8.onnx"
    out.parent.mkdir()
    quantize_onnx(fp32_onnx, out, precision="int8", calib_samples=32, evaluate=False)
    assert fp32_source(out) == fp32_onnx.resolve()
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(fp32_onnx, moved / "model.onnx")  # only the relative path can find it now: break the absolute one
    side = json.loads(sidecar_path(out).read_text())
    side.update(source_onnx="/nowhere/model.onnx", source_onnx_relative="../moved/model.onnx")
    sidecar_path(out).write_text(json.dumps(side))
    assert fp32_source(out) == (moved / "model.onnx").resolve()
    (moved / "model.onnx").write_bytes(b"changed")  # another file under that name is not the original
    assert fp32_source(out) is None and fp32_source(fp32_onnx) is None  # an FP32 export has no source ONNX


def test_target_hint_for_bench():
    from deploycomp.quantize import INT8_TARGETS, target_hint

    trt, cpu = ({"quantization": {"target": t}} for t in ("tensorrt", "ort-cpu"))
    assert target_hint(trt, "ort", "cpu") == INT8_TARGETS.get("tensorrt").hint
    assert "--target ort-cpu" in target_hint(trt, "ort", "cpu")
    assert "--target tensorrt" in target_hint(cpu, "trt", "cuda")
    assert "does not pay off" in target_hint(cpu, "ort", "cpu")
    assert "does not pay off" in target_hint(trt, "trt")
    assert "--target tensorrt" in target_hint(cpu, "ort", "cuda")  # ORT's CUDA provider is not what ort-cpu is for
    assert "older deploycomp" in target_hint({"precision": "int8"}, "ort", "cpu")


def _activation_scales(path) -> dict:
    from onnx import numpy_helper

    return {i.name: float(numpy_helper.to_array(i)) for i in load_onnx(path).graph.initializer
            if i.name.endswith("_scale") and not i.dims}


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibrators(fp32_onnx, tmp_path, method):
    rec = quantize_onnx(fp32_onnx, tmp_path / f"{method}.onnx", precision="int8", calib_samples=32,
                        calib_method=method, evaluate=False)
    assert rec["quantization"]["calib_method"] == method
    quantize_onnx(fp32_onnx, tmp_path / "minmax.onnx", precision="int8", calib_samples=32, evaluate=False)
    minmax, hist = _activation_scales(tmp_path / "minmax.onnx"), _activation_scales(tmp_path / f"{method}.onnx")
    assert any(hist[k] < minmax[k] * 0.99 for k in minmax)  # the histogram method clips some ranges


@pytest.fixture(scope="module")
def baseline_onnx(tmp_path_factory, request) -> tuple[Path, bool]:
    """The shipped baseline as ONNX (the session's tiny checkpoint stands in where the baseline is missing)."""
    baseline = Path(BASELINE).exists()
    ckpt = load_model(str(BASELINE if baseline else request.getfixturevalue("tiny_checkpoint")))
    onnx = tmp_path_factory.mktemp("baseline") / "m.onnx"
    export_onnx(ckpt, onnx, dynamic_batch=True, simplify=False, parity=False)
    return onnx, baseline


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"], ids=["for-ort-cpu", "for-trt"])  # not the marker name
def test_int8_top1_of_baseline_within_one_point(baseline_onnx, tmp_path, target):
    """For each target the shipped baseline loses at most 1 point of top-1 (1,000 test images, the same for both).

    Without the baseline, the session's tiny checkpoint (one epoch on 1,024 images, ~20 % top-1) stands in:
    such an unconverged net has no accuracy worth preserving, so only the measurement itself is checked.
    """
    onnx, baseline = baseline_onnx
    rec = quantize_onnx(onnx, tmp_path / "q.onnx", precision="int8", target=target, calib_samples=256,
                        eval_samples=1000)
    acc = rec["accuracy"]
    assert acc["samples"] == 1000 and acc["dataset"] == "fashion-mnist" and rec["quantization"]["target"] == target
    assert 0 <= acc["top1_pct"] <= 100 and acc["top1_drop_points"] == pytest.approx(acc["fp32_top1_pct"]
                                                                                      - acc["top1_pct"])
    if baseline:
        assert acc["fp32_top1_pct"] > 85.0
        assert acc["top1_drop_points"] <= 1.0 and acc["prediction_agreement_pct"] >= 97.0, acc


# -- errors ----------------------------------------------------------------------------------------------


def test_cli_quantize_prints_accuracy(cli, fp32_onnx):
    shutil.copy(fp32_onnx, "m.onnx")
    shutil.copy(sidecar_path(fp32_onnx), "m.onnx.json")
    result = cli("quantize", "m.onnx", "--precision", "fp16", "--eval-samples", "128")
    assert "top-1 on fashion-mnist" in result.output and Path("m.fp16.onnx").exists()


def test_int8_without_dataset_is_one_line_error(cli, fp32_onnx):
    shutil.copy(fp32_onnx, "bare.onnx")  # no sidecar: nothing says which data calibrates it
    assert_one_line_error(cli("quantize", "bare.onnx", "-p", "int8", ok=False), "calibration needs data", "--data")
    result = cli("quantize", "bare.onnx", "-p", "int8", "--data", "fashion-mnist", "--data-dir", "nowhere", ok=False)
    assert_one_line_error(result, "Fashion-MNIST files not found")
    assert not Path("bare.int8.onnx").exists()


def test_bad_inputs_are_one_line_errors(cli, fp32_onnx, tmp_path):
    Path("notes.onnx").write_text("not a model")
    assert_one_line_error(cli("quantize", "notes.onnx", "-p", "fp16", ok=False), "not an ONNX model")
    assert_one_line_error(cli("quantize", "missing.onnx", "-p", "fp16", ok=False), "does not exist")
    quantize_onnx(fp32_onnx, tmp_path / "h.onnx", precision="fp16", evaluate=False)
    assert_one_line_error(cli("quantize", tmp_path / "h.onnx", "-p", "int8", ok=False), "already fp16")
    assert_one_line_error(cli("quantize", fp32_onnx, "-p", "int8", "-o", fp32_onnx, ok=False), "own input")


def test_bad_target_is_one_line_error(cli, fp32_onnx):
    shutil.copy(fp32_onnx, "m.onnx")
    shutil.copy(sidecar_path(fp32_onnx), "m.onnx.json")
    result = cli("quantize", "m.onnx", "-p", "int8", "--target", "tensorrtt", ok=False)
    assert_one_line_error(result, "unknown INT8 target 'tensorrtt'", "did you mean 'tensorrt'", "ort-cpu")
    assert_one_line_error(cli("quantize", "m.onnx", "-p", "fp16", "--target", "tensorrt", ok=False),
                          "--target applies to --precision int8 only")
    assert not list(Path().glob("m.*.onnx"))


def test_build_refuses_an_ort_cpu_graph(cli, fp32_onnx, tmp_path):
    """TensorRT takes signed INT8 Q/DQ only: an ort-cpu graph is a one-line error (before TensorRT is looked for)."""
    out = tmp_path / "m.int8.onnx"
    quantize_onnx(fp32_onnx, out, precision="int8", calib_samples=32, evaluate=False)
    result = cli("build", out, ok=False)
    assert_one_line_error(result, "quantized for ort-cpu (uint8 activations)", "--target tensorrt")
    assert not list(tmp_path.glob("*.engine"))


def test_cli_target_help_names_every_target():
    from click.testing import CliRunner

    from deploycomp.cli import cli as group
    from deploycomp.quantize import INT8_TARGETS

    text = CliRunner().invoke(group, ["quantize", "--help"]).output
    assert "--target ort-cpu|tensorrt" in text and "|".join(INT8_TARGETS.names()) in text


def test_cli_calibration_choices_match_the_registry():
    from deploycomp.cli.options import CALIBRATION_METHODS as CLI_METHODS
    from deploycomp.quantize import CALIBRATION_METHODS

    assert sorted(CLI_METHODS) == CALIBRATION_METHODS.names()
