"""Hardening, ONNX external data: weights stored beside the model are read; a location outside the
model's folder (path traversal, an absolute path) or a symbolic link is refused before any reader
opens it, and a missing or truncated data file is one line naming the tensor and the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploycomp.errors import InputFileError
from deploycomp.export import check_onnx_file, load_onnx
from tests.harden_util import invoke, set_external_location, tiny_onnx


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """``model/m.onnx`` with its weights in ``model/weights.bin``, and a secret outside the folder."""
    tiny_onnx(tmp_path / "model" / "m.onnx", external="weights.bin")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "weights.bin").write_bytes((tmp_path / "model" / "weights.bin").read_bytes())
    return tmp_path / "model"


def test_external_data_beside_the_model_is_used(model_dir, tmp_path):
    model = load_onnx(model_dir / "m.onnx")
    assert all(t.raw_data for t in model.graph.initializer)  # the weights were read in
    result = invoke("quantize", model_dir / "m.onnx", "-p", "fp16", "--no-eval", "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    result = invoke("bench", model_dir / "m.onnx", "--iters", "2", "--warmup", "0", "--warmup-ms", "0")
    assert result.exit_code == 0, result.output


def _absolute(model_dir: Path) -> str:
    return str(model_dir.parent / "secret" / "weights.bin")


def _link_out(model_dir: Path) -> str:
    (model_dir / "link.bin").symlink_to(model_dir.parent / "secret" / "weights.bin")
    return "link.bin"


def _link_in(model_dir: Path) -> str:
    """A link even to a file inside the folder is refused (ONNX's own loader refuses every link too)."""
    os.rename(model_dir / "weights.bin", model_dir / "real.bin")
    (model_dir / "weights.bin").symlink_to("real.bin")
    return "weights.bin"


def _truncated(model_dir: Path) -> str:
    data = (model_dir / "weights.bin").read_bytes()
    (model_dir / "short.bin").write_bytes(data[: len(data) // 2])
    return "short.bin"


CASES = [
    (lambda d: "../secret/weights.bin", "leads outside the model's folder"),
    (lambda d: "sub/../../secret/weights.bin", "leads outside the model's folder"),
    (_absolute, "not a path relative to the model"),
    (_link_out, "is a symbolic link"),
    (_link_in, "is a symbolic link"),
    (lambda d: "nothere.bin", "does not exist"),
    (_truncated, "is truncated"),
    (lambda d: "", "not a path relative to the model"),
]
IDS = ["traversal", "traversal-inside-path", "absolute", "symlink-out", "symlink-in", "missing", "truncated",
       "empty-location"]


@pytest.mark.parametrize("location, fragment", CASES, ids=IDS)
def test_unsafe_or_missing_external_data_is_refused(model_dir, tmp_path, location, fragment):
    target = set_external_location(model_dir / "m.onnx", location(model_dir))
    with pytest.raises(InputFileError, match=fragment):
        check_onnx_file(target)
    for argv in (["quantize", target, "-p", "fp16", "--no-eval", "-o", tmp_path / "out.onnx"],
                 ["bench", target, "--iters", "1"],
                 ["build", target]):
        result = invoke(*argv)
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and fragment in errors[0] and "m.onnx" in errors[0], result.output
        assert "conv.weight" in errors[0] or "fc.weight" in errors[0]  # names the tensor
    assert not (tmp_path / "out.onnx").exists()
