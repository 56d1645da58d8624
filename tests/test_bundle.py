"""Edge bundles: contents, preprocessing metadata, and the build script run against a stand-in trtexec
for TensorRT 10 and for TensorRT 11."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from deploycomp import console
from deploycomp.files import sha256
from tests.conftest import assert_one_line_error, needs_fmnist

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained light_resnet18 with Fashion-MNIST metadata (structure, not accuracy, is tested here)."""
    from deploycomp.checkpoint import load_model
    from deploycomp.data import FASHION_MNIST_CLASSES

    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1)
    ckpt.metadata.update({"dataset": "fashion-mnist", "input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353],
                          "class_names": FASHION_MNIST_CLASSES})
    return ckpt.save(tmp_path_factory.mktemp("bundle") / "fm.pt")


@pytest.fixture(scope="module")
def jetson_bundle(checkpoint, tmp_path_factory) -> Path:
    from click.testing import CliRunner

    from deploycomp.cli import cli

    out = tmp_path_factory.mktemp("b") / "jetson"
    result = CliRunner().invoke(cli, ["-q", "bundle", "--model", str(checkpoint), "-o", str(out), "--target",
                                      "jetson", "--max-batch", "16", "--calib-samples", "32", "--eval-samples", "128"])
    assert result.exit_code == 0, result.output
    console.set_verbosity(console.NORMAL)
    return out


def test_bundle_contents(jetson_bundle, checkpoint):
    names = sorted(p.name for p in jetson_bundle.iterdir())
    assert names == ["README.md", "build_engine.sh", "bundle.json", "model.fp16.onnx", "model.fp16.onnx.json",
                     "model.int8.onnx", "model.int8.onnx.json", "model.onnx", "model.onnx.json", "preprocess.json"]
    manifest = json.loads((jetson_bundle / "bundle.json").read_text())
    assert manifest["target"] == "jetson" and manifest["source"] == str(checkpoint)
    for name, digest in manifest["files"].items():
        assert sha256(jetson_bundle / name) == digest
    assert set(manifest["models"]) == {"fp32", "fp16", "int8"}
    assert manifest["models"]["int8"]["accuracy"]["samples"] == 128
    assert manifest["export_parity"]["passed"] and manifest["profile"]["max"] == [16, 1, 28, 28]
    side = json.loads((jetson_bundle / "model.int8.onnx.json").read_text())
    assert side["source_onnx"] == "model.onnx"  # paths inside the bundle are relative to it
    assert os.access(jetson_bundle / "build_engine.sh", os.X_OK)


def test_preprocessing_metadata(jetson_bundle):
    pre = json.loads((jetson_bundle / "preprocess.json").read_text())
    assert pre["input_name"] == "input" and pre["input_shape"] == [None, 1, 28, 28] and pre["layout"] == "NCHW"
    assert pre["mean"] == [0.286] and pre["std"] == [0.353] and pre["color"] == "grayscale"
    assert pre["resize"] == [28, 28] and len(pre["class_names"]) == 10 and pre["scale"] == pytest.approx(1 / 255)


def test_readme_has_both_tensorrt_versions(jetson_bundle):
    text = (jetson_bundle / "README.md").read_text()
    assert "TensorRT 10:" in text and "TensorRT 11:" in text and "./build_engine.sh" in text
    assert "--onnx=model.int8.onnx" in text and "0.286" in text


FAKE = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT_VERSION}]"
[ "$1" = "--help" ] && exit 0
echo "$*" >> "$FAKE_TRTEXEC_LOG"
for a in "$@"; do case "$a" in --saveEngine=*) : > "${a#--saveEngine=}";; esac; done
"""


@pytest.mark.parametrize("version, major", [("100300", 10), ("110100", 11)])
def test_build_script_runs_the_right_commands(jetson_bundle, tmp_path, version, major):
    exe = tmp_path / "trtexec"
    exe.write_text(FAKE)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "log"
    env = {**os.environ, "TRTEXEC": str(exe), "FAKE_TRT_VERSION": version, "FAKE_TRTEXEC_LOG": str(log),
           "DLA_CORE": "1"}
    work = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(jetson_bundle), str(work)], check=True)
    proc = subprocess.run(["bash", str(work / "build_engine.sh"), "fp16", "int8"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"--onnx=model.fp16.onnx --saveEngine=engines/model.fp16.trt{major}.engine")
    assert "--maxShapes=input:16x1x28x28" in lines[1] and "--timingCacheFile=timing.cache" in lines[1]
    if major == 10:
        assert all("--stronglyTyped" in line and "--useDLACore=1 --allowGPUFallback" in line for line in lines)
    else:
        assert not any("--stronglyTyped" in line or "--fp16" in line or "DLA" in line for line in lines)
    assert (work / "engines" / f"model.int8.trt{major}.engine").exists()
    bad = subprocess.run(["bash", str(work / "build_engine.sh"), "bf16"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown precision" in bad.stderr


def test_x86_fp32_only_bundle(cli, checkpoint):
    cli("bundle", "--model", checkpoint, "-o", "x86", "--target", "x86", "-p", "fp32", "--batch", "4")
    names = sorted(p.name for p in Path("x86").iterdir())
    assert "model.int8.onnx" not in names and "model.fp16.onnx" not in names and "model.onnx" in names
    script = Path("x86/build_engine.sh").read_text()
    assert "DLA" not in script and "Shapes" not in script  # fixed batch 4: no profile
    assert subprocess.run(["bash", "-n", "x86/build_engine.sh"]).returncode == 0


def test_bundle_errors(cli, checkpoint):
    Path("full").mkdir()
    Path("full/x").write_text("x")
    assert_one_line_error(cli("bundle", "--model", checkpoint, "-o", "full", ok=False), "not an empty directory")
    result = cli("bundle", "--model", checkpoint, "-o", "b", "--min-batch", "8", "--opt-batch", "4", ok=False)
    assert_one_line_error(result, "--min-batch 8 is larger than --opt-batch 4")
    assert not Path("b").exists() and [p.name for p in Path(".").iterdir() if p.name.startswith(".")] == []
