"""Hardening, outputs: a missing directory is created; a file in the way, a directory, a read-only or
full disk, and an output that is (also through a link) one of the inputs end in one line, with the
inputs intact and no partial file left, neither under the final name nor as a temporary file."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harden_util import half_writing, invoke, leftovers, snapshot, synthetic_checkpoint, tiny_onnx


def one_error(result) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture()
def onnx_model(tmp_path) -> Path:
    return tiny_onnx(tmp_path / "in" / "m.onnx")


def _mount_tmpfs(d: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True)
    return done.returncode == 0


@pytest.fixture()
def readonly_dir(tmp_path):
    """A directory nothing can be written to: a read-only tmpfs as root, mode 0555 otherwise."""
    d = tmp_path / "readonly"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if not _mount_tmpfs(d, "ro,size=64k"):
        pytest.skip("root here cannot mount a read-only tmpfs (and ignores file permissions)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs root with mount permission)."""
    d = tmp_path / "small-disk"
    d.mkdir()
    if not _mount_tmpfs(d, "size=1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)  # lazy: a failed writer may still hold a file


def test_missing_output_directories_are_created(onnx_model, tmp_path):
    out = tmp_path / "new" / "sub" / "m.fp16.onnx"
    result = invoke("quantize", onnx_model, "-p", "fp16", "--no-eval", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.is_file() and Path(f"{out}.json").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["quantize", "IN", "-p", "fp16", "--no-eval", "-o", "OUT"],
    ["bench", "IN", "--iters", "1", "--warmup", "0", "--warmup-ms", "0", "--json", "OUT"],
])
def test_a_file_in_the_way_of_the_output_directory(onnx_model, tmp_path, argv):
    blocker = tmp_path / "notadir"
    blocker.write_text("a file")
    out = blocker / "x.onnx"
    args = [onnx_model if a == "IN" else out if a == "OUT" else a for a in argv]
    error = one_error(invoke(*args))
    assert "notadir is a file, not a directory" in error, error
    assert blocker.read_text() == "a file" and leftovers(tmp_path) == []


def test_output_that_is_a_directory(onnx_model, tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    error = one_error(invoke("bench", onnx_model, "--iters", "1", "--json", d))
    assert "is a directory" in error and "adir" in error, error
    assert list(d.iterdir()) == []


def _alias(kind: str, target: Path, where: Path) -> Path:
    """Another name for ``target``: the same path spelled differently, a symbolic or a hard link."""
    if kind == "same":
        return target
    if kind == "dotted":
        (where / "sub").mkdir(exist_ok=True)
        return where / "sub" / ".." / target.name
    alias = where / f"alias-{kind}{target.suffix}"
    if kind == "symlink":
        alias.symlink_to(target)
    else:
        os.link(target, alias)
    return alias


@pytest.mark.parametrize("kind", ["same", "dotted", "symlink", "hardlink"])
def test_quantize_output_that_is_its_input(onnx_model, kind):
    out = _alias(kind, onnx_model, onnx_model.parent)
    before = snapshot(onnx_model)
    error = one_error(invoke("quantize", onnx_model, "-p", "fp16", "--no-eval", "-o", out))
    assert "is the command's own input" in error, error
    assert snapshot(onnx_model) == before and leftovers(onnx_model.parent) == []
    if kind == "symlink":
        assert out.is_symlink()


@pytest.mark.parametrize("argv, victim", [
    (["bench", "IN", "--iters", "1", "--json", "ALIAS"], "onnx"),
    (["train", "--model", "IN", "--epochs", "1", "-o", "ALIAS"], "checkpoint"),
    (["distill", "--teacher", "IN", "--student", "light_resnet18", "--epochs", "1", "-o", "ALIAS"], "checkpoint"),
])
def test_outputs_never_replace_an_input_through_a_link(onnx_model, tmp_path, monkeypatch, argv, victim):
    monkeypatch.chdir(tmp_path)
    source = onnx_model if victim == "onnx" else synthetic_checkpoint(tmp_path / "in" / "model.pt")
    alias = _alias("symlink", source, tmp_path)
    before = snapshot(source)
    error = one_error(invoke(*[source if a == "IN" else alias if a == "ALIAS" else a for a in argv]))
    assert "is the command's own input" in error, error
    assert snapshot(source) == before and alias.is_symlink() and leftovers(tmp_path) == []


def test_a_symlink_output_is_written_through(onnx_model, tmp_path):
    """A link to an unrelated file: the file it names gets the output, the link stays a link."""
    target = tmp_path / "elsewhere" / "result.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    assert invoke("quantize", onnx_model, "-p", "fp16", "--no-eval", "-o", link).exit_code == 0
    assert link.is_symlink() and target.read_bytes()[:2] != b"ol" and leftovers(tmp_path) == []


@pytest.mark.parametrize("argv", [
    ["quantize", "IN", "-p", "fp16", "--no-eval", "-o", "DIR/x.onnx"],
    ["bench", "IN", "--iters", "1", "--json", "DIR/x.json"],
    ["export", "--model", "light_resnet18", "--data", "synthetic", "-o", "DIR/x.onnx"],
])
def test_read_only_directory(onnx_model, readonly_dir, argv):
    before = snapshot(onnx_model)
    args = [onnx_model if a == "IN" else a.replace("DIR", str(readonly_dir)) for a in argv]
    error = one_error(invoke(*args))
    assert "cannot write" in error and str(readonly_dir) in error, error
    assert "read-only" in error or "not writable" in error, error
    assert list(readonly_dir.iterdir()) == [] and snapshot(onnx_model) == before


def test_full_disk(small_disk, tmp_path, monkeypatch):
    """A real 1 MiB disk: a 10 MiB ONNX export and checkpoint fail in one line and leave nothing."""
    monkeypatch.chdir(tmp_path)
    error = one_error(invoke("export", "--model", "light_resnet18", "--data", "synthetic", "-o",
                             small_disk / "model.onnx", "--no-simplify"))
    assert "No space left on device" in error and "model.onnx" in error and "disk is full" in error, error
    assert list(small_disk.iterdir()) == []
    error = one_error(invoke("train", "--model", "light_resnet18", "--data", "synthetic", "--epochs", "1",
                             "--train-samples", "32", "--val-samples", "32", "--batch-size", "32",
                             "-o", small_disk / "model.pt"))
    assert "disk is full" in error and "model.pt" in error, error
    assert [p.name for p in small_disk.iterdir()] == []


# --------------------------------------------------------------------------------------------------
# A fault-injecting writer: the disk fills up in the middle of a write (runs everywhere)


def _filling(real, nth: int = 1):
    """A save function whose ``nth`` call writes half of its output, then fails like a full disk."""
    return half_writing(real, nth, lambda f: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f)))


def test_disk_fills_while_writing_onnx(onnx_model, tmp_path, monkeypatch):
    import onnx

    monkeypatch.setattr(onnx, "save", _filling(lambda m, f: onnx.save_model(m, f)))
    out = tmp_path / "out" / "m.fp16.onnx"
    before = snapshot(onnx_model)
    error = one_error(invoke("quantize", onnx_model, "-p", "fp16", "--no-eval", "-o", out))
    assert "disk is full" in error and "m.fp16.onnx" in error, error
    assert not out.exists() and not Path(f"{out}.json").exists() and leftovers(tmp_path) == []
    assert snapshot(onnx_model) == before


def test_disk_fills_while_writing_the_record(onnx_model, tmp_path, monkeypatch):
    """The artifact is complete but its JSON record cannot be written: neither is kept."""
    real = Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name.startswith(".m.fp16.onnx.json"):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "out" / "m.fp16.onnx"
    error = one_error(invoke("quantize", onnx_model, "-p", "fp16", "--no-eval", "-o", out))
    assert "disk is full" in error and "m.fp16.onnx.json" in error, error
    assert not out.exists() and not Path(f"{out}.json").exists() and leftovers(tmp_path) == []


def test_disk_fills_while_writing_a_checkpoint(tmp_path, monkeypatch):
    """The final checkpoint of a training run: one line, no file, and the training is kept for --resume."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "save", _filling(torch.save, nth=2))  # 1: the resume state, 2: the checkpoint
    args = ["train", "--model", "light_resnet18", "--data", "synthetic", "--epochs", "1", "--train-samples", "32",
            "--val-samples", "32", "--batch-size", "32", "-o", "m.pt"]
    error = one_error(invoke(*args))
    assert "disk is full" in error and "m.pt" in error, error
    assert not (tmp_path / "m.pt").exists() and leftovers(tmp_path) == []
    assert (tmp_path / "m.pt.resume.pt").is_file()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    result = invoke(*args, "--resume")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.pt").is_file() and not (tmp_path / "m.pt.resume.pt").exists()
