"""Hardening, files given to options: every bad file ends in one line naming it, and stays untouched.

Each option that takes a file (models, teachers, students, ONNX models, recipes, run directories,
resume states) is given a missing file, an empty one, a directory, junk bytes, a real file cut in
half, a file of another kind (ONNX for a checkpoint and the reverse, JSON, PNG), a symbolic link
loop, and a file without read permission.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.harden_util import (
    BASELINE,
    EXPECTED,
    OTHER_USER_SCRIPT,
    bad_files,
    invoke,
    run_without_privileges,
    snapshot,
    tiny_onnx,
)

KINDS = list(EXPECTED)

# (name, argv with F for the bad file, family); every command fails on F before any heavy work.
CHECKPOINT_SLOTS = [
    ("info --model", ["info", "--model", "F"]),
    ("eval --model", ["eval", "--model", "F"]),
    ("export --model", ["export", "--model", "F", "-o", "out.onnx"]),
    ("train --model", ["train", "--model", "F", "--epochs", "1", "-o", "out.pt"]),
    ("prune --model", ["prune", "--model", "F", "--method", "magnitude", "--ratio", "0.1", "-o", "out.pt"]),
    ("prune --distill-from", ["prune", "--model", "light_resnet18", "--data", "synthetic", "--method", "magnitude",
                              "--ratio", "0.1", "--finetune-epochs", "1", "--distill-from", "F", "-o", "out.pt"]),
    ("distill --teacher", ["distill", "--teacher", "F", "--student", "light_resnet18", "-o", "out.pt"]),
    ("distill --student", ["distill", "--teacher", str(BASELINE), "--student", "F", "-o", "out.pt"]),
    ("bench (checkpoint)", ["bench", "F", "--iters", "1"]),
    ("bundle --model", ["bundle", "--model", "F", "-o", "out-bundle"]),
]
ONNX_SLOTS = [
    ("quantize MODEL.onnx", ["quantize", "F", "-p", "fp16"]),
    ("build MODEL.onnx", ["build", "F"]),
    ("bench (ONNX)", ["bench", "F", "--iters", "1"]),
]
RECIPE_SLOTS = [("pipeline RECIPE", ["pipeline", "F", "-o", "run"])]

# What the error says beyond EXPECTED, per family (None: only that it names the file).
FAMILY = {
    "checkpoint": {"junk": "not a readable PyTorch checkpoint", "wrong-kind": "an ONNX model"},
    "onnx": {"junk": "not a readable ONNX model", "wrong-kind": "PyTorch checkpoint"},
    "recipe": {"junk": "not a text recipe", "wrong-kind": "an ONNX model", "json": "unknown key",
               "truncated": None},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    d = tmp_path_factory.mktemp("bad-files")
    onnx = tiny_onnx(d / "good" / "tiny.onnx")
    recipe = d / "good" / "recipe.yaml"
    recipe.write_text("name: t\nmodel: light_resnet18\ndata: {name: synthetic}\nvariants:\n"
                      "  - name: mag50\n    prune: {method: magnitude, ratio: 0.5}\n")
    return {"checkpoint": bad_files(d / "pt", BASELINE, onnx, ".pt"),
            "onnx": bad_files(d / "onnx", onnx, BASELINE, ".onnx"),
            "recipe": bad_files(d / "yaml", recipe, onnx, ".yaml")}


def _cases(slots, family):
    return [pytest.param(argv, family, kind, id=f"{name}-{kind}") for name, argv in slots for kind in KINDS]


@pytest.mark.parametrize("argv, family, kind", _cases(CHECKPOINT_SLOTS, "checkpoint") + _cases(ONNX_SLOTS, "onnx")
                         + _cases(RECIPE_SLOTS, "recipe"))
def test_bad_file_is_one_line_naming_it(files, tmp_path, monkeypatch, argv, family, kind):
    monkeypatch.chdir(tmp_path)
    bad = files[family][kind]
    before = snapshot(bad)
    args = [str(bad) if a == "F" else a for a in argv]
    result = invoke(*args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert bad.name in errors[0], errors[0]
    expected = FAMILY[family].get(kind, EXPECTED[kind])
    if expected:
        assert expected in errors[0], errors[0]
    assert snapshot(bad) == before  # the input is untouched
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("setup, fragment", [
    ("missing", "no run.json"),
    ("empty-dir", "no run.json"),
    ("junk-run-json", "cannot read JSON"),
    ("empty-run-json", "the file is empty"),
    ("run-json-directory", "is a directory"),
    ("run-json-loop", "symbolic link loop"),
    ("other-json", "not a deploycomp pipeline run"),
])
def test_bad_run_directory_for_report(tmp_path, setup, fragment):
    run = tmp_path / "run"
    if setup != "missing":
        run.mkdir()
    record = run / "run.json"
    if setup == "junk-run-json":
        record.write_bytes(b"{\x00\x01 not json")
    elif setup == "empty-run-json":
        record.write_bytes(b"")
    elif setup == "run-json-directory":
        record.mkdir()
    elif setup == "run-json-loop":
        record.symlink_to("run.json")
    elif setup == "other-json":
        record.write_text('{"format": "something else"}')
    result = invoke("report", run, "--no-plots")
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0] and "run" in errors[0], result.output


@pytest.mark.parametrize("content, fragment", [
    (b"", "is empty"),
    (b"junk" * 100, "damaged or belongs to another run"),
    ("baseline-half", "damaged or belongs to another run"),
    ("baseline", "damaged or belongs to another run"),  # a checkpoint, not a resume state
])
def test_bad_resume_state(tmp_path, monkeypatch, content, fragment):
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "out.pt.resume.pt"
    data = BASELINE.read_bytes() if isinstance(content, str) else content
    state.write_bytes(data[: len(data) // 2] if content == "baseline-half" else data)
    result = invoke("-q", "train", "--model", "light_resnet18", "--data", "synthetic", "--epochs", "1",
                    "--train-samples", "32", "--val-samples", "32", "--batch-size", "32", "-o", "out.pt", "--resume")
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and fragment in errors[0] and "out.pt.resume.pt" in errors[0], result.output
    assert state.read_bytes() == (data[: len(data) // 2] if content == "baseline-half" else data)
    assert not (tmp_path / "out.pt").exists()


def test_leftover_resume_state_is_not_overwritten(tmp_path, monkeypatch):
    """A new run over the resume state of an interrupted one refuses instead of losing it."""
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "out.pt.resume.pt"
    state.write_bytes(b"state of an interrupted run")
    result = invoke("train", "--model", "light_resnet18", "--data", "synthetic", "--epochs", "1", "-o", "out.pt")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--resume" in errors[0] and "interrupted run" in errors[0], result.output
    assert state.read_bytes() == b"state of an interrupted run"


def test_unreadable_files(tmp_path):
    """A file without read permission (the test drops root's override) is one line naming it."""
    d = tmp_path
    onnx = tiny_onnx(d / "model.onnx")
    shutil.copy(BASELINE, d / "model.pt")
    (d / "recipe.yaml").write_text("name: t\n")
    run = d / "run"
    run.mkdir()
    (run / "run.json").write_text('{"format": "deploycomp.pipeline"}')
    for p in (onnx, d / "model.pt", d / "recipe.yaml", run / "run.json"):
        p.chmod(0o000)
    commands = [["info", "--model", "model.pt"], ["quantize", "model.onnx", "-p", "fp16", "-o", "/tmp/x.onnx"],
                ["pipeline", "recipe.yaml", "-o", str(d / "newrun")], ["report", "run", "--no-plots"]]
    try:
        results = run_without_privileges(OTHER_USER_SCRIPT.format(commands=commands), d)
    finally:
        for p in (onnx, d / "model.pt", d / "recipe.yaml", run / "run.json"):
            p.chmod(0o644)
    names = ["model.pt", "model.onnx", "recipe.yaml", "run.json"]
    for r, name in zip(results, names, strict=True):
        assert r["exception"] is None and r["exit_code"] != 0, r
        errors = [line for line in r["output"].splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, r
        assert name in errors[0] and ("not readable" in errors[0] or "Permission denied" in errors[0]), r
