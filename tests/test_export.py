"""ONNX export: parity for every built-in and a sample of torchvision models, dynamic batch, pruned
checkpoints (channels and removed blocks), the failure path, sidecar contents and CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deploycomp.checkpoint import load_model
from deploycomp.errors import ParityError, UsageError
from deploycomp.export import export_onnx, io_info, load_onnx, ort_run, ort_session
from deploycomp.files import sidecar_path
from tests.conftest import HAS_FMNIST, assert_one_line_error, needs_fmnist

# mobilenet_v2 (depthwise) is exported pruned below; these cover SE blocks, hardswish, channel shuffle, SiLU.
TORCHVISION_SAMPLE = ["mobilenet_v3_small", "resnet18", "shufflenet_v2_x0_5", "efficientnet_b0"]


@pytest.fixture(autouse=True)
def _quiet(quiet_console):
    """Progress lines off for every test here (conftest.quiet_console)."""


def fmnist_checkpoint(path: Path, arch: str = "light_resnet18") -> Path:
    """An untrained checkpoint carrying Fashion-MNIST metadata (loads in milliseconds, unlike training)."""
    from deploycomp.data import FASHION_MNIST_CLASSES

    ckpt = load_model(arch, num_classes=10, in_channels=1)
    ckpt.metadata.update({"dataset": "fashion-mnist", "input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353],
                          "class_names": FASHION_MNIST_CLASSES, "num_classes": 10})
    return ckpt.save(path)


def realistic_activations(ckpt, batch: int = 8):
    """Set BatchNorm statistics from a few forward passes: untrained nets with fresh running stats shrink
    their logits to ~1e-10 (efficientnet, mobilenets), where any parity check would pass vacuously."""
    model = ckpt.model
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(batch, *ckpt.input_shape))
    model.eval()
    return ckpt


def builtin_models() -> list[str]:
    from deploycomp.zoo import list_models

    return list_models(include_torchvision=False)


@pytest.mark.parametrize("arch", builtin_models())
def test_parity_builtin(arch, tmp_path):
    from deploycomp.tasks import task_of_checkpoint

    ckpt = realistic_activations(load_model(arch, num_classes=10, input_size=(16, 16)))  # small images: fast
    # a detector's head numerically (its NMS export, judged by matched detections: tests/test_detection.py)
    rec = export_onnx(ckpt, tmp_path / f"{arch}.onnx", simplify=False, raw=task_of_checkpoint(ckpt) == "detection")
    p = rec["parity"]
    assert p["max_abs_logit"] > 1e-2  # the comparison is not vacuous
    assert p["passed"] and p["max_abs_diff"] <= p["tolerance"]
    assert p["top1_agreement_pct"] >= 99.0
    assert rec["checker"] == "passed"


@pytest.mark.parametrize("arch", TORCHVISION_SAMPLE)
def test_parity_torchvision_small_inputs(arch, tmp_path):
    ckpt = realistic_activations(load_model(arch, num_classes=10, input_size=(32, 32)))
    rec = export_onnx(ckpt, tmp_path / f"{arch}.onnx", simplify=False)
    assert rec["parity"]["passed"] and rec["parity"]["max_abs_logit"] > 1e-2, rec["parity"]
    assert rec["input_shape"] == [1, 3, 32, 32]


def test_dynamic_batch_1_to_8(tmp_path):
    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1, input_size=(28, 28))
    out = tmp_path / "dyn.onnx"
    rec = export_onnx(ckpt, out, dynamic_batch=True, parity=False, simplify=False)  # compared below, batch by batch
    assert rec["dynamic_batch"] and rec["input_shape"][0] is None
    assert io_info(load_onnx(out))["dynamic_batch"]
    session = ort_session(out)
    for batch in range(1, 9):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            ref = ckpt.model(x).numpy()
        got = ort_run(session, x)
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, ref, atol=1e-4 + 1e-3 * np.abs(ref).max())


def test_fixed_batch_and_sidecar(tmp_path):
    src = fmnist_checkpoint(tmp_path / "src.pt")
    ckpt = load_model(str(src))
    out = tmp_path / "b4.onnx"
    rec = export_onnx(ckpt, out, batch=4, parity=HAS_FMNIST)
    side = json.loads(sidecar_path(out).read_text())
    assert side == json.loads(json.dumps(rec))
    assert side["input_shape"] == [4, 1, 28, 28] and not side["dynamic_batch"]
    for key in ("input_name", "output_name", "opset", "mean", "std", "class_names", "dataset", "source",
                "source_sha256", "arch", "macs", "params_total", "precision", "onnx_sha256"):
        assert side[key] is not None, key
    assert side["precision"] == "fp32" and side["opset"] == 17 and side["source"] == str(src)
    assert side["macs"] > 0 and side["params_total"] == sum(p.numel() for p in ckpt.model.parameters())
    if HAS_FMNIST:  # real images of the checkpoint's dataset were used, in batches of 4
        assert side["parity"]["real"]["samples"] >= 32 and side["parity"]["real"]["batch_sizes"] == [4]


def test_channel_pruned_depthwise_checkpoint(tmp_path):
    import torch_pruning as tp

    import deploycomp.surgery  # noqa: F401  (registers "prune_channels"; add_surgery does not import it)

    ckpt = load_model("mobilenet_v2", num_classes=10, input_size=(32, 32))  # depthwise + residuals
    ckpt.metadata["input_shape"] = [3, 32, 32]
    example = torch.randn(1, 3, 32, 32)
    head = ckpt.model.classifier[-1]
    pruner = tp.pruner.MagnitudePruner(ckpt.model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.3, ignored_layers=[head])
    pruner.step()
    ckpt.add_surgery("prune_channels", history=pruner.pruning_history())
    realistic_activations(ckpt)
    ckpt.save(tmp_path / "pruned.pt")
    pruned = load_model(str(tmp_path / "pruned.pt"))
    before = sum(p.numel() for p in load_model("mobilenet_v2", num_classes=10).model.parameters())
    rec = export_onnx(pruned, tmp_path / "pruned.onnx", simplify=True)
    assert rec["parity"]["passed"] and rec["parity"]["max_abs_logit"] > 1e-2 and rec["surgeries"] == ["prune_channels"]
    assert rec["params_total"] < before and rec["simplify"]["simplified"]
    model = load_onnx(tmp_path / "pruned.onnx")
    groups = [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
    assert max(groups) > 1  # the depthwise convolutions are still grouped after pruning and simplification


def test_removed_blocks_checkpoint(tmp_path):
    """Depth pruning replaces whole residual blocks; a checkpoint replaying that exports like any other."""
    import importlib

    from deploycomp.checkpoint import SURGERIES, register_surgery

    def drop(model, names):
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, torch.nn.Identity())

    importlib.import_module("deploycomp.surgery")
    op = "drop_blocks" if "drop_blocks" in SURGERIES else "test_drop_blocks"  # depth pruning's own surgery
    if op not in SURGERIES:
        register_surgery(op)(lambda model, record, example_input: drop(model, record["blocks"]))
    ckpt = load_model("light_resnet18", num_classes=10, input_size=(16, 16))
    blocks = ["layer1.1", "layer3.1", "layer4.1"]
    drop(ckpt.model, blocks)
    ckpt.add_surgery(op, blocks=blocks)
    ckpt.save(tmp_path / "shallow.pt")
    rec = export_onnx(load_model(str(tmp_path / "shallow.pt")), tmp_path / "shallow.onnx")
    assert rec["parity"]["passed"]
    convs = sum(n.op_type == "Conv" for n in load_onnx(tmp_path / "shallow.onnx").graph.node)
    assert convs == 20 - 2 * len(blocks)


def test_parity_failure_keeps_only_a_failed_file(tmp_path):
    ckpt = load_model("light_resnet18", num_classes=10, input_size=(16, 16))
    out = tmp_path / "model.onnx"
    with pytest.raises(ParityError, match="FAILED-parity"):
        export_onnx(ckpt, out, atol=0, rtol=1e-12, simplify=False)
    assert not out.exists() and not sidecar_path(out).exists()
    assert (tmp_path / "model.FAILED-parity.onnx").exists()
    assert json.loads((tmp_path / "model.FAILED-parity.onnx.json").read_text())["failed"] == "parity"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_opset_errors():
    ckpt = load_model("light_resnet18", num_classes=10)
    with pytest.raises(UsageError, match="opsets 9-20"):
        export_onnx(ckpt, "never.onnx", opset=25)
    with pytest.raises(UsageError, match="dynamic-batch"):
        export_onnx(ckpt, "never.onnx", batch=2, dynamic_batch=True)
    assert not Path("never.onnx").exists()


# -- CLI ------------------------------------------------------------------------------------------------


@needs_fmnist
def test_cli_export_checkpoint(cli, tmp_path):
    src = fmnist_checkpoint(tmp_path / "fm.pt")
    result = cli("export", "--model", src, "--dynamic-batch")
    assert "max |diff|" in result.output and "top-1 agreement" in result.output
    assert Path("fm.onnx").exists() and Path("fm.onnx.json").exists()
    side = json.loads(Path("fm.onnx.json").read_text())
    assert side["dataset"] == "fashion-mnist" and "real" in side["parity"]


@needs_fmnist
def test_cli_parity_failure_exit(cli, tmp_path):
    src = fmnist_checkpoint(tmp_path / "fm.pt")
    result = cli("export", "--model", src, "-o", "m.onnx", "--atol", "0", "--rtol", "1e-12", "--no-simplify", ok=False)
    assert_one_line_error(result, "disagrees with PyTorch", "m.FAILED-parity.onnx")
    assert not Path("m.onnx").exists() and Path("m.FAILED-parity.onnx").exists()


def test_cli_opset_error(cli):
    assert_one_line_error(cli("export", "--opset", "30", ok=False), "--opset 30", "torchscript")
    assert_one_line_error(cli("export", "--batch", "2", "--dynamic-batch", ok=False), "exclude each other")


def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (not a deploycomp dependency)")
    ckpt = load_model("light_resnet18", num_classes=10, input_size=(16, 16))
    rec = export_onnx(ckpt, tmp_path / "d.onnx", exporter="dynamo", dynamic_batch=True, simplify=False)
    assert rec["opset"] == 18 and rec["parity"]["passed"] and rec["exporter"] == "dynamo"
