"""INT8 that keeps its accuracy: --max-drop returns the layer that INT8 breaks to float, --sensitivity
ranks it first, and every bad input is a one-line error that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploycomp import console
from deploycomp.quantize import quantize_onnx
from deploycomp.sensitivity import smallest_prefix
from tests.conftest import assert_one_line_error, needs_fmnist

pytestmark = needs_fmnist

OUTLIER = 1e5  # one activation channel this large: a per-tensor INT8 scale of ~800 zeroes every other value


@pytest.fixture(autouse=True)
def _quiet():
    console.set_verbosity(console.QUIET)
    yield
    console.set_verbosity(console.NORMAL)


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
    """ort-cpu also quantizes the Add that carries the outlier: with every Conv/Gemm in float INT8 still loses."""
    _copy(outlier_onnx, "m.onnx")
    result = cli("quantize", "m.onnx", "-p", "int8", "--max-drop", "0", "--rank-samples", "300",
                 "--calib-samples", "64", "--no-bench", ok=False)
    assert_one_line_error(result, "--max-drop 0: only FP32 meets it", "nothing written")
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
