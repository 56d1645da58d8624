"""Checkpoints: safe to load, identical after a round trip, never half-written, never over their input."""

from __future__ import annotations

import pickle

import pytest
import torch

from deploycomp.checkpoint import Checkpoint, load_checkpoint, load_model
from deploycomp.errors import CheckpointError, UsageError


def _same_outputs(a, b, shape=(2, 1, 28, 28)):
    x = torch.randn(*shape)
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_roundtrip_is_identical_and_weights_only(tmp_path):
    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1)
    ckpt.metadata.update({"dataset": "fashion-mnist", "input_shape": [1, 28, 28]})
    ckpt.add_lineage("train", epochs=1)
    path = ckpt.save(tmp_path / "a.pt")
    raw = torch.load(path, weights_only=True)  # must not need pickle of arbitrary classes
    assert raw["format"] == "deploycomp.checkpoint" and raw["arch"] == "light_resnet18"
    assert raw["metadata"]["lineage"][0]["op"] == "train"
    again = load_checkpoint(path)
    assert _same_outputs(ckpt.model, again.model)
    assert again.input_shape == (1, 28, 28) and again.source == str(path)


def test_pruned_checkpoint_replays_history(tmp_path):
    import torch_pruning as tp

    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1)
    ckpt.metadata["input_shape"] = [1, 28, 28]
    model = ckpt.model.eval()
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, 1, 28, 28), tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.25, ignored_layers=[model.fc])
    pruner.step()
    ckpt.add_surgery("prune_channels", history=pruner.pruning_history())
    path = ckpt.save(tmp_path / "pruned.pt")
    again = load_checkpoint(path)
    assert again.model.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels == 24
    assert _same_outputs(model, again.model)


def test_pickled_module_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), path)
    with pytest.raises(CheckpointError, match="if you trust its origin pass --trust-pickle, or save its"):
        load_checkpoint(path, trust_option="--trust-pickle")
    with pytest.raises(CheckpointError, match="loaded; save its state_dict"):  # no flag to name: none named
        load_checkpoint(path)
    trusted = load_checkpoint(path, trust_pickle=True)
    assert trusted.trusted_pickle
    with pytest.raises(UsageError, match="cannot be saved"):
        trusted.save(tmp_path / "copy.pt")


def test_plain_state_dict_needs_arch(tmp_path):
    model = load_model("resnet18_small", num_classes=10, in_channels=1).model
    path = tmp_path / "sd.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UsageError, match="--arch"):
        load_checkpoint(path)
    loaded = load_checkpoint(path, arch="resnet18_small")
    assert loaded.model_kwargs == {"num_classes": 10, "in_channels": 1}
    assert _same_outputs(model, loaded.model)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, arch="light_resnet18")


def test_foreign_and_corrupt_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"epoch": 3, "note": "hello"}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="neither a deploycomp checkpoint nor a state dict"):
        load_checkpoint(tmp_path / "dict.pt")
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump(print, f)  # any global: weights_only loading refuses it
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")


def test_write_is_atomic_and_never_over_input(tmp_path, monkeypatch):
    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1)
    target = ckpt.save(tmp_path / "m.pt")
    before = target.read_bytes()
    loaded = load_checkpoint(target)
    with pytest.raises(UsageError, match="own input"):
        loaded.save(target)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    other = Checkpoint(ckpt.model, ckpt.arch, ckpt.model_kwargs)
    with pytest.raises(OSError):
        other.save(target)
    assert target.read_bytes() == before  # the old file survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary left behind
