"""INT8 that keeps its accuracy: --max-drop returns the layer that INT8 breaks to float, --sensitivity
ranks it first, and every bad input is a one-line error that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deploycomp import console
from deploycomp.quantize import quantize_onnx
from deploycomp.sensitivity import smallest_prefix
from tests.conftest import assert_one_line_error, needs_fmnist

pytestmark = needs_fmnist

OUTLIER = 1e5  # one activation channel this large: a per-tensor INT8 scale of ~800 zeroes every other value


@pytest.fixture(autouse=True)
def _quiet(quiet_console):
    """Progress lines off for every test here (conftest.quiet_console)."""


@pytest.fixture(scope="module")
def outlier_onnx(tmp_path_factory) -> Path:
    """A small CNN trained briefly on Fashion-MNIST whose conv2 input has one constant channel of 1e5.

    conv1's ninth channel is the constant (weight 0, bias 1e5) and conv2 ignores it (weight 0), so FP32
    is unchanged by it; but conv2's input quantized per tensor gets a scale of 1e5/127 and every real
    activation rounds to 0. Keeping conv2 in float (no Q/DQ on its input, tensorrt placement) restores it.
    """
    import torch
    import torch.nn as nn

    from deploycomp.data import load_dataset, make_loader, subset

    class Doubled(nn.Module):  # h + h: an Add, which ort-cpu quantizes and tensorrt placement does not
        def forward(self, h):
            return h + h

    console.set_verbosity(console.QUIET)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), Doubled(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    train, _ = load_dataset("fashion-mnist", "train")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for x, y in make_loader(subset(train, 4096, seed=1), 64, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    # a ninth conv1 channel, the constant outlier, that conv2 ignores: the FP32 function is unchanged
    conv1, conv2 = nn.Conv2d(1, 9, 3, padding=1), nn.Conv2d(9, 16, 3, stride=2, padding=1)
    with torch.no_grad():
        conv1.weight.zero_()
        conv1.weight[:8], conv1.bias[:8], conv1.bias[8] = model[0].weight, model[0].bias, OUTLIER
        conv2.weight.zero_()
        conv2.weight[:, :8], conv2.bias[:] = model[3].weight, model[3].bias
    model[0], model[3] = conv1, conv2
    model.eval()
    out = tmp_path_factory.mktemp("guard") / "outlier.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(out), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    out.with_name(out.name + ".json").write_text(json.dumps({"dataset": "fashion-mnist"}))
    return out


def _conv_names(path: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


def test_max_drop_returns_the_broken_layer_to_float(outlier_onnx, tmp_path):
    out = tmp_path / "g.onnx"
    rec = quantize_onnx(outlier_onnx, out, precision="int8", target="tensorrt", quantize_all_layers=True,
                        max_drop=3.0, sensitivity=True, rank_samples=500, eval_samples=1000, calib_samples=64,
                        bench=False)
    guard = rec["quantization"]["guard"]
    conv2 = _conv_names(outlier_onnx)[1]
    assert guard["int8_drop_points"] > 20  # the outlier wrecks full INT8
    assert [r["layer"] for r in guard["float_layers"]] == [conv2]
    assert guard["sensitivity"][0]["layer"] == conv2 and guard["sensitivity"][0]["rank"] == 1
    assert guard["validation_drop_points"] <= 3.0
    assert rec["accuracy"]["top1_drop_points"] <= 3.0  # and the test split agrees
    assert guard["layers_considered"] == 3 and guard["evaluation_bound"] == 3 + 3 + 2
    assert guard["evaluations"] <= guard["evaluation_bound"]
    assert conv2 in rec["quantization"]["float_nodes"]
    assert guard["speed"] is None  # bench=False
    # the written graph really has conv2 in float: no DequantizeLinear feeds it
    import onnx

    g = onnx.load(str(out)).graph
    producers = {o: n.op_type for n in g.node for o in n.output}
    node = next(n for n in g.node if n.name == conv2)
    assert producers.get(node.input[0]) != "DequantizeLinear"
    side = json.loads(Path(str(out) + ".json").read_text())
    assert [r["layer"] for r in side["quantization"]["guard"]["float_layers"]] == [conv2]
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"g.sensitivity.{ext}").stat().st_size > 0
    assert f"| 1 | `{conv2}` | Conv |" in (tmp_path / "g.sensitivity.md").read_text()


def test_max_drop_met_by_full_int8_keeps_every_layer_int8(outlier_onnx, tmp_path):
    rec = quantize_onnx(outlier_onnx, tmp_path / "g.onnx", precision="int8", target="tensorrt",
                        quantize_all_layers=True, max_drop=100.0, rank_samples=200, eval_samples=200,
                        calib_samples=64, bench=False)
    guard = rec["quantization"]["guard"]
    assert guard["float_layers"] == [] and guard["evaluations"] == 2 and "sensitivity" not in guard


def test_smallest_prefix_bisects():
    calls = []

    def meets(k):
        calls.append(k)
        return k >= 5

    assert smallest_prefix(meets, 37) == 5 and len(calls) <= 6
    assert smallest_prefix(lambda k: True, 1) == 1


def _copy(src: Path, name: str) -> None:
    import shutil

    shutil.copy(src, name)
    shutil.copy(str(src) + ".json", name + ".json")


@pytest.mark.parametrize("value, fragment", [("-1", "0 or more points"), ("nan", "finite"), ("inf", "finite"),
                                             ("-inf", "finite")])
def test_bad_max_drop_is_one_line_error(cli, outlier_onnx, value, fragment):
    _copy(outlier_onnx, "m.onnx")
    result = cli("quantize", "m.onnx", "-p", "int8", f"--max-drop={value}", ok=False)
    assert_one_line_error(result, "--max-drop", fragment)
    assert sorted(p.name for p in Path().iterdir()) == ["m.onnx", "m.onnx.json"]


def test_max_drop_only_fp32_meets_is_one_line_error(cli, outlier_onnx):
    """tensorrt, every layer INT8: a bound of 0 is met only with all three layers in float, the FP32 model."""
    _copy(outlier_onnx, "m.onnx")
    result = cli("quantize", "m.onnx", "-p", "int8", "--target", "tensorrt", "--quantize-all-layers", "--max-drop",
                 "0", "--rank-samples", "300", "--calib-samples", "64", "--no-bench", ok=False)
    assert_one_line_error(result, "--max-drop 0: only FP32 meets it", "that is the FP32 model", "nothing written")
    assert sorted(p.name for p in Path().iterdir()) == ["m.onnx", "m.onnx.json"]


def test_guard_without_labelled_data_is_one_line_error(cli, outlier_onnx):
    _copy(outlier_onnx, "m.onnx")
    assert_one_line_error(cli("quantize", "m.onnx", "-p", "int8", "--max-drop", "1", "--no-eval", ok=False),
                          "--max-drop measures accuracy on labelled data")
    result = cli("quantize", "m.onnx", "-p", "int8", "--sensitivity", "--data", "synthetic", ok=False)
    assert_one_line_error(result,
                          "--sensitivity needs labelled data", "synthetic")
    assert_one_line_error(cli("quantize", "m.onnx", "-p", "fp16", "--max-drop", "1", ok=False),
                          "--max-drop applies to --precision int8 only")
    assert sorted(p.name for p in Path().iterdir()) == ["m.onnx", "m.onnx.json"]


@pytest.fixture(scope="module")
def scaled_onnx(outlier_onnx, tmp_path_factory) -> Path:
    """The outlier model's graph with the outlier channel at 0 and its Add replaced by a Mul with a constant
    per-channel scale [2, ..., 2, 1e5]: the FP32 function is unchanged (2h = h + h; the scaled channel is 0
    and conv2 ignores it) but quantizing that constant per tensor rounds every 2 to 0, so the Mul zeroes the
    network. Keeping every Mul in float (an operator group, ort-cpu) is the fix; no weighted layer helps."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(outlier_onnx))
    inits = {i.name: i for i in model.graph.initializer}
    conv1 = next(n for n in model.graph.node if n.op_type == "Conv")
    bias = numpy_helper.to_array(inits[conv1.input[2]]).copy()
    bias[8] = 0.0  # the constant channel is now 0 after the ReLU
    inits[conv1.input[2]].CopyFrom(numpy_helper.from_array(bias, conv1.input[2]))
    add = next(n for n in model.graph.node if n.op_type == "Add")
    scale = np.full((1, 9, 1, 1), 2.0, dtype=np.float32)
    scale[0, 8] = 1e5
    model.graph.initializer.append(numpy_helper.from_array(scale, "channel_scale"))
    i = list(model.graph.node).index(add)
    model.graph.node.remove(add)
    model.graph.node.insert(i, helper.make_node("Mul", [add.input[0], "channel_scale"], list(add.output),
                                                name="scale_mul"))
    out = tmp_path_factory.mktemp("scaled") / "scaled.onnx"
    onnx.save(model, str(out))
    out.with_name(out.name + ".json").write_text(json.dumps({"dataset": "fashion-mnist"}))
    return out


def test_candidates_include_operator_groups_for_ort_cpu_only(scaled_onnx):
    from deploycomp.quantize import QuantizeOptions
    from deploycomp.sensitivity import candidate_layers

    cpu = candidate_layers(scaled_onnx, QuantizeOptions(target="ort-cpu"))
    trt = candidate_layers(scaled_onnx, QuantizeOptions(target="tensorrt", quantize_all_layers=True))
    weighted = [c.name for c in trt]
    assert [c.op_type for c in trt] == ["Conv", "Conv", "Gemm"] and not any(c.is_group for c in trt)
    assert [c.name for c in cpu if not c.is_group] == weighted
    groups = {c.op_type: c for c in cpu if c.is_group}
    assert groups["Mul"].nodes == ("scale_mul",) and groups["Mul"].name == "every Mul (1 node)"
    assert len(groups["Relu"].nodes) == 2 and "Conv" not in groups


def test_max_drop_keeps_an_operator_group_in_float(scaled_onnx, tmp_path):
    out = tmp_path / "g.onnx"
    rec = quantize_onnx(scaled_onnx, out, precision="int8", max_drop=3.0, rank_samples=300, eval_samples=1000,
                        calib_samples=64, bench=False)
    guard = rec["quantization"]["guard"]
    assert guard["int8_drop_points"] > 20
    assert [(r["layer"], r["nodes"]) for r in guard["float_layers"]] == [("every Mul (1 node)", ["scale_mul"])]
    assert guard["float_layers"][0]["rank"] == 1 and guard["float_layers"][0]["gain_points"] > 20
    assert "scale_mul" in rec["quantization"]["float_nodes"]
    assert rec["accuracy"]["top1_drop_points"] <= 3.0
    import onnx

    g = onnx.load(str(out)).graph  # the Mul takes its float constant, not a dequantized one
    producers = {o: n.op_type for n in g.node for o in n.output}
    mul = next(n for n in g.node if n.name == "scale_mul")
    assert producers.get(mul.input[1]) != "DequantizeLinear"
