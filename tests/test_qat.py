"""Quantization-aware training: the rounding it simulates is the rounding onnxruntime's quantizer applies
(scales, zero points, BatchNorm folding), the weights end on the grid, and `train --qat` / a pipeline
`qat` step are one-line errors on bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from deploycomp.qat import QuantAwareModel, calibration_images, fake_quant_for
from deploycomp.quantize import quantize_onnx
from tests.conftest import assert_one_line_error, needs_fmnist

pytestmark = needs_fmnist


@pytest.fixture(autouse=True)
def _quiet(quiet_console):
    """Progress lines off for every test here (conftest.quiet_console)."""


@pytest.fixture(scope="module")
def calib():
    from deploycomp.data import load_dataset

    return calibration_images(load_dataset("fashion-mnist", "train")[0])


def _net():
    """conv-BN-ReLU x2, pooling, a classifier; BatchNorm far from identity, some scales negative (the graph
    folds them into the convolutions, which must not change the rounding)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.2, 3.0)
            bn.weight.uniform_(-2.0, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _export(net, path: Path) -> Path:
    import torch

    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    path.with_name(path.name + ".json").write_text(json.dumps({"dataset": "fashion-mnist"}))
    return path


def _step(net, steps: int = 3) -> None:
    """A few SGD steps in train mode: the float weights move off the grid (the parametrization rounds them)."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
@pytest.mark.parametrize("lo, hi", [(-1.3, 4.2), (0.0, 6.0), (-3.0, -1.0), (0.25, 0.5), (0.0, 0.0)])
def test_activation_scale_and_zero_point_are_onnxruntimes(target, lo, hi):
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    spec = fake_quant_for(target)
    dtype = np.int8 if spec.act_qmin < 0 else np.uint8
    zero, scale = compute_scale_zp(np.float32(lo), np.float32(hi), dtype(spec.act_qmin), dtype(spec.act_qmax),
                                   symmetric=spec.act_symmetric)
    ours = spec.activation_params(lo, hi)
    assert ours[1] == int(zero)
    assert ours[0] == pytest.approx(float(scale), rel=1e-6)


def test_targets_simulate_their_own_rounding():
    cpu, trt = fake_quant_for("ort-cpu"), fake_quant_for("tensorrt")
    assert (cpu.act_qmin, cpu.act_qmax, cpu.act_symmetric, cpu.keep_float) == (0, 255, False, "none")
    assert (trt.act_qmin, trt.act_qmax, trt.act_symmetric, trt.keep_float) == (-127, 127, True, "first_and_last")
    assert trt.weight_qmax == 127


def _weights(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _weight_rounding_error(fp32: Path, int8: Path) -> float:
    """Largest |dequantized INT8 weight - FP32 graph weight| of the Conv/Gemm weights, in units of their scale."""
    import onnx

    w32, w8 = _weights(fp32), _weights(int8)
    worst, seen = 0.0, 0
    for n in onnx.load(str(int8)).graph.node:
        q = n.input[0]
        if n.op_type != "DequantizeLinear" or not q.endswith("_quantized") or w8[q].dtype != np.int8:
            continue
        name = q.removesuffix("_quantized")
        if name not in w32 or w32[name].ndim < 2:
            continue
        scale = w8[n.input[1]].reshape(-1, *([1] * (w32[name].ndim - 1)))
        worst = max(worst, float(np.max(np.abs(w8[q] * scale - w32[name]) / scale)))
        seen += 1
    assert seen == 3  # two convolutions (BatchNorm folded in) and the classifier
    return worst


def test_weights_end_on_the_grid_the_quantizer_uses(calib, tmp_path):
    """After QAT the FP32 graph's weights (BatchNorm folded in by the exporter) are exactly representable:
    onnxruntime's per-channel INT8 rounding changes them by nothing; before QAT by up to half a step."""
    net = _net()
    ptq = _export(net, tmp_path / "ptq.onnx")
    quantize_onnx(ptq, tmp_path / "ptq.int8.onnx", precision="int8", evaluate=False, calib_samples=32)
    assert _weight_rounding_error(ptq, tmp_path / "ptq.int8.onnx") > 0.3  # a float weight: rounding moves it

    qat = QuantAwareModel(net, fake_quant_for("ort-cpu"), calib)
    _step(net)
    qat.remove()
    src = _export(net, tmp_path / "qat.onnx")
    quantize_onnx(src, tmp_path / "qat.int8.onnx", precision="int8", evaluate=False, calib_samples=32)
    assert _weight_rounding_error(src, tmp_path / "qat.int8.onnx") < 1e-3


def test_simulated_model_computes_what_onnxruntime_runs(calib, tmp_path):
    """tensorrt placement with every layer INT8 is exactly what QAT simulates (Q/DQ on the inputs and weights
    of Conv/Gemm): the fake-quantized PyTorch model and ONNX Runtime running the Q/DQ graph agree."""
    import torch

    from deploycomp.export import ort_run, ort_session

    net = _net()
    qat = QuantAwareModel(net, fake_quant_for("tensorrt"), calib, all_layers=True)
    assert qat.skipped == [] and len(qat.layers) == 3
    _step(net)
    qat.calibrate()  # the ranges of the final weights, as quantize will measure them
    x = torch.cat([b for b, _ in calib[:4]])
    with torch.no_grad():
        simulated = net(x).numpy()
    qat.remove()
    with torch.no_grad():
        float_out = net(x).numpy()
    src = _export(net, tmp_path / "m.onnx")
    quantize_onnx(src, tmp_path / "m.int8.onnx", precision="int8", target="tensorrt", quantize_all_layers=True,
                  evaluate=False)
    ort = ort_run(ort_session(tmp_path / "m.int8.onnx"), x.numpy())
    scale = np.abs(float_out).max()
    assert np.abs(ort - simulated).max() < 0.02 * scale  # a rounding tie may flip one step somewhere
    assert np.abs(ort - simulated).mean() < 1e-3 * scale
    assert np.abs(ort - float_out).mean() > 10 * np.abs(ort - simulated).mean()  # INT8 is visibly not float


def test_tensorrt_keeps_its_float_layers_unsimulated(calib):
    net = _net()
    qat = QuantAwareModel(net, fake_quant_for("tensorrt"), calib)
    assert qat.skipped == ["0", "8"]  # the first convolution and the classifier, as quantize keeps them
    assert [n for n, _ in qat.layers] == ["3"]
    qat.remove()
    assert not hasattr(net[3], "parametrizations")


def test_train_qat_cli(cli, tmp_path):
    import torch

    from deploycomp.checkpoint import load_model

    r = cli("train", "--qat", "ort-cpu", "--epochs", "1", "--train-samples", "256", "--val-samples", "200",
            "--batch-size", "64", "-o", tmp_path / "qat.pt")
    assert "with INT8 simulated for ort-cpu" in r.output and "deploycomp quantize" in r.output
    side = json.loads((tmp_path / "qat.pt.json").read_text())
    assert side["command"] == "qat"
    assert side["params"]["qat"]["target"] == "ort-cpu" and side["params"]["qat"]["layers"] == 21
    assert side["params"]["lr"] == pytest.approx(1e-3)  # a hundredth of SGD's default
    ckpt = load_model(str(tmp_path / "qat.pt"))
    convs = [m for m in ckpt.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(convs) == 21
    for m in convs:  # every weight on its per-channel grid
        w = m.weight.detach().flatten(1)
        q = w / (w.abs().amax(dim=1, keepdim=True) / 127)
        assert torch.allclose(q, q.round(), atol=1e-3)


@pytest.mark.parametrize("args, fragments", [
    (["--qat", "ort-gpu"], ["INT8 target", "ort-gpu", "ort-cpu"]),
    (["--qat-all-layers"], ["--qat-all-layers needs --qat"]),
    (["--qat", "tensorrt", "--freeze", "layer1"], ["--qat cannot be combined"]),
])
def test_train_qat_bad_input(cli, tmp_path, args, fragments):
    r = cli("train", *args, "--epochs", "1", "-o", tmp_path / "x.pt", ok=False)
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "x.pt").exists()


def test_recipe_qat_step(tmp_path):
    import yaml

    from deploycomp.pipeline import RecipeError, check_recipe, describe_steps, load_recipe
    from tests.test_pipeline import VALID

    text = VALID.replace("export: {", "  - name: q\n    qat: {target: tensorrt, epochs: 2, train_samples: 32}\n"
                                      "export: {")
    top = check_recipe(yaml.safe_load(text), "t.yaml")
    assert describe_steps(top["variants"][1]) == "QAT for tensorrt, 2 ep"
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("target: tensorrt", "target: tensorrrt"))
    with pytest.raises(RecipeError, match=r"variants\[1\]\.qat\.target.*tensorrrt"):
        load_recipe(bad)


def test_pipeline_qat_step_runs(cli, tmp_path):
    """A variant whose qat step follows the original: the stage trains with fake INT8 and saves grid weights."""
    import torch

    from deploycomp.checkpoint import load_model
    from tests.test_pipeline import VALID

    recipe = tmp_path / "q.yaml"
    recipe.write_text(VALID.replace("  - name: mag50\n    prune: {method: magnitude, ratio: 0.5, finetune: {epochs: 1, "
                                    "train_samples: 32, batch_size: 32}}\n",
                                    "  - name: q\n    qat: {epochs: 1, train_samples: 32, batch_size: 32}\n")
                      .replace("backends: [torch, ort]", "backends: [ort]"))
    cli("-q", "pipeline", recipe, "-o", tmp_path / "run")
    stage = next((tmp_path / "run" / "stages").glob("qat-*"))
    record = json.loads((stage / "record.json").read_text())["record"]
    assert record["command"] == "qat" and record["params"]["qat"]["target"] == "ort-cpu"
    assert record["params"]["lr"] == pytest.approx(1e-3) and record["params"]["epochs"] == 1
    model = load_model(str(next(stage.glob("*.pt")))).model
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight.detach().flatten(1)
            q = w / (w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127)
            assert torch.allclose(q, q.round(), atol=1e-3)


def test_ort_cpu_simulates_the_operators_between_layers(calib, tmp_path):
    """ort-cpu quantizes the tensors between the layers too (the BatchNorm-folded convolution outputs, SiLU's
    sigmoid and product, pooling): with those rounded, the fake-quantized model is closer to what ONNX Runtime
    runs than with the layer inputs alone (measured: 0.0009 against 0.0020 mean |diff| of the logits)."""
    import torch

    from deploycomp.export import ort_run, ort_session

    x = torch.cat([b for b, _ in calib[:4]])

    def silu_net():
        net = _net()
        net[2], net[5] = torch.nn.SiLU(), torch.nn.SiLU()
        return net

    def simulated(between: bool) -> np.ndarray:
        net = silu_net()
        spec = fake_quant_for("ort-cpu")
        qat = QuantAwareModel(net, spec if between else dataclasses.replace(spec, quantize_between=False), calib)
        assert qat.between == (5 if between else 0)  # 2 BatchNorm, 2 SiLU, 1 pooling
        with torch.no_grad():
            out = net(x).numpy()
        qat.remove()
        return out

    full, inputs_only = simulated(True), simulated(False)
    src = _export(silu_net(), tmp_path / "m.onnx")
    quantize_onnx(src, tmp_path / "m.int8.onnx", precision="int8", evaluate=False)
    ort = ort_run(ort_session(tmp_path / "m.int8.onnx"), x.numpy())
    assert np.abs(ort - full).mean() < 0.6 * np.abs(ort - inputs_only).mean()


def test_relu_after_batchnorm_rounds_once(calib):
    """Conv-BN-ReLU: onnxruntime quantizes the folded convolution output once, with the ReLU's range."""
    qat = QuantAwareModel(_net(), fake_quant_for("ort-cpu"), calib)
    assert qat.between == 3  # the two ReLU and the pooling, not the BatchNorm before each ReLU
    qat.remove()


def test_silu_is_simulated_as_the_graph_computes_it(calib):
    """SiLU exports as x * Sigmoid(x), both rounded; an in-place SiLU must not overwrite the input the
    simulation needs, and gets its in-place flag back when QAT is removed."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.SiLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 10)).eval()
    x = calib[0][0][:8]
    qat = QuantAwareModel(net, fake_quant_for("ort-cpu"), calib)
    assert not net[1].inplace and qat.between == 2  # SiLU and the pooling
    with torch.no_grad():
        h = net[0](x)
        sim = net[1](h)
        ref = h * torch.sigmoid(h)
    step = float(ref.max() - ref.min()) / 255
    assert float((sim - ref).abs().max()) < 3 * step  # rounded x * sigmoid(x) ...
    assert float((torch.nn.functional.silu(ref) - ref).abs().max()) > 30 * step  # ... not silu(silu(x))
    qat.remove()
    assert net[1].inplace
