"""Hardening, interruption: Ctrl-C (SIGINT), SIGTERM and SIGKILL during train, prune, export, quantize
and pipeline never leave a half-written artifact under its final name; `train --resume` continues from
the last finished epoch; a pipeline run again reuses its finished stages, with the same numbers.

The in-process tests raise KeyboardInterrupt (what SIGINT becomes in Python) at the worst moment: in the
middle of writing an artifact. The subprocess tests send real signals to a real `deploycomp`. A pipeline
killed by SIGKILL and run again (reusing its finished stages) is in test_harden_lock.py, where a second
pipeline waits for the killed one.
"""

from __future__ import annotations

import json
import signal

from tests.harden_util import TINY_RECIPE, half_writing, invoke, leftovers, snapshot, start, tiny_onnx, wait_for

TRAIN = ["train", "--model", "light_resnet18", "--data", "synthetic", "--train-samples", "64", "--val-samples", "32",
         "--batch-size", "32", "-o", "m.pt"]


def _interrupting(real, nth: int = 1):
    """A save function whose ``nth`` call (to a file) writes half of its output, then gets Ctrl-C."""
    return half_writing(real, nth, lambda f: KeyboardInterrupt())


def interrupted(result) -> str:
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "interrupted" in errors[0], result.output
    return errors[0]


# --------------------------------------------------------------------------------------------------
# Ctrl-C in the middle of writing, in process


def test_ctrl_c_while_writing_a_pruned_checkpoint(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "save", _interrupting(torch.save))
    interrupted(invoke("prune", "--model", "light_resnet18", "--data", "synthetic", "--method", "magnitude",
                       "--ratio", "0.3", "--finetune-epochs", "0", "--no-recalibrate-bn", "--eval-samples", "32",
                       "-o", "p.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ctrl_c_while_writing_onnx(tmp_path, monkeypatch):
    import onnx

    monkeypatch.chdir(tmp_path)
    src = tiny_onnx(tmp_path / "m.onnx")
    before = snapshot(src)
    monkeypatch.setattr(onnx, "save", _interrupting(lambda m, f: onnx.save_model(m, f)))
    interrupted(invoke("quantize", src, "-p", "fp16", "--no-eval"))  # onnx.save of the FP16 graph
    interrupted(invoke("export", "--model", "light_resnet18", "--data", "synthetic", "-o", "e.onnx"))  # onnxslim
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and snapshot(src) == before


def test_ctrl_c_in_a_pipeline_stage(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    monkeypatch.setattr(torch, "save", _interrupting(torch.save, nth=2))  # 1: the load stage, 2: the prune stage
    error = interrupted(invoke("pipeline", "tiny.yaml", "-o", "run", "--no-plots"))
    assert "run the same command again" in error, error
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    stages = {d.name.split("-")[0]: d for d in (run / "stages").iterdir()}
    assert (stages["load"] / "record.json").is_file() and (stages["load"] / "model.pt").is_file()
    assert sorted(p.name for p in stages["prune"].iterdir()) == []  # neither a half model nor a record
    assert leftovers(run) == [] and not (run / ".deploycomp.lock").exists()


# --------------------------------------------------------------------------------------------------
# Real signals to a real process


def test_sigint_then_sigkill_during_training_lose_nothing(tmp_path, monkeypatch):
    """SIGINT while epoch 2 of 3 writes its resume state: one line, no checkpoint, epoch 1's state intact.
    The resumed run continues after epoch 1; SIGKILL while it writes its checkpoint; --resume then
    finishes without redoing any. (The interrupt is placed by blocking the write, not by timing: three
    epochs of this tiny run take about a second.)"""
    import torch

    monkeypatch.chdir(tmp_path)
    state = tmp_path / "m.pt.resume.pt"
    marker = tmp_path / "writing-state"
    proc = start([*TRAIN, "--epochs", "3"], tmp_path, block_on="torch:save:2", marker=marker)
    wait_for(marker.exists, 240, proc, "epoch 2's resume state write")
    marker.unlink()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--resume" in errors[0] and "Traceback" not in out, out
    assert not (tmp_path / "m.pt").exists() and leftovers(tmp_path) == []
    done = torch.load(state, weights_only=True)["epochs_done"]
    assert done == 1

    marker = tmp_path / "writing"  # the resumed run saves its state after each remaining epoch, then the model
    proc = start([*TRAIN, "--epochs", "3", "--resume"], tmp_path, block_on=f"torch:save:{3 - done + 1}",
                 marker=marker)
    wait_for(marker.exists, 240, proc, "the final checkpoint write")
    proc.kill()
    out, _ = proc.communicate(timeout=60)
    assert f"resuming from m.pt.resume.pt after epoch {done}/3" in out, out
    assert not (tmp_path / "m.pt").exists()  # only a hidden temporary file holds the half checkpoint
    saved = torch.load(state, weights_only=True)
    assert saved["epochs_done"] == 3

    result = invoke("-q", *TRAIN, "--epochs", "3", "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["history"] == saved["history"]  # nothing redone, nothing lost
    assert (tmp_path / "m.pt").is_file() and not state.exists()


def test_sigterm_while_exporting_removes_the_partial_file(tmp_path, monkeypatch):
    """SIGTERM (kill, docker stop) ends like Ctrl-C: exit 130, one line, the half-written ONNX removed."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "writing"
    args = ["export", "--model", "light_resnet18", "--data", "synthetic", "-o", "m.onnx"]
    proc = start(args, tmp_path, block_on="onnx:save:1", marker=marker)  # onnxslim's save of the graph
    wait_for(marker.exists, 240, proc, "the ONNX write")
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert len([line for line in out.splitlines() if line.startswith("Error:")]) == 1, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writing"]  # no ONNX, no record, no temporary
