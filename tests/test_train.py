"""fit() and evaluate(): learns on real data, resumes exactly, runs under torchrun with DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploycomp import console
from deploycomp.data import load_dataset
from deploycomp.train import TrainConfig, TrainingInterrupted, evaluate, fit
from deploycomp.zoo import build_model
from tests.conftest import needs_fmnist


@pytest.fixture(autouse=True)
def _quiet(quiet_console):
    """Progress lines off for every test here (conftest.quiet_console)."""


@needs_fmnist
def test_learns_fashion_mnist_subset_quickly():
    train, _ = load_dataset("fashion-mnist", "train", augment=True)
    test, _ = load_dataset("fashion-mnist", "test")
    model = build_model("light_resnet18", num_classes=10, in_channels=1)
    # Well under a minute on two idle cores; speed is for benchmarks, so only accuracy is asserted here.
    fit(model, train, None, TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=2e-3, train_samples=2000))
    result = evaluate(model, test, samples=2000)
    assert result["top1_pct"] > 70, result


def _synthetic():
    return load_dataset("synthetic", "train")[0], load_dataset("synthetic", "test")[0]


def test_resume_gives_the_same_result(tmp_path):
    train, val = _synthetic()
    cfg = TrainConfig(epochs=3, batch_size=64, train_samples=256, seed=1)
    straight = build_model("light_resnet18", num_classes=10, in_channels=3)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    fit(straight, train, val, cfg)

    resumed = build_model("light_resnet18", num_classes=10, in_channels=3)
    resumed.load_state_dict(init)
    state = tmp_path / "run.resume.pt"

    def interrupt(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="--resume"):
        fit(resumed, train, val, cfg, resume_path=state, on_epoch_end=interrupt)
    assert state.exists()
    result = fit(resumed, train, val, cfg, resume_path=state, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert not state.exists()
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_frozen_everything_is_an_error():
    from deploycomp.errors import UsageError

    train, _ = _synthetic()
    model = build_model("light_resnet18", num_classes=10, in_channels=3)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(UsageError, match="frozen"):
        fit(model, train, None, TrainConfig(epochs=1))


def test_cuda_without_cuda_is_a_usage_error():
    from deploycomp.errors import UsageError
    from deploycomp.train import resolve_device

    if torch.cuda.is_available():
        pytest.skip(reason="CUDA is present here, so asking for it is not an error")
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda")


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun --nproc-per-node 2 on gloo: both ranks train, only rank 0 writes."""
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "deploycomp", "-q", "train", "-m", "light_resnet18", "-d", "synthetic", "--epochs", "1",
           "--batch-size", "32", "--train-samples", "128", "--device", "cpu", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and Path(f"{out}.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.pt", "ddp.pt.json"]


def test_val_samples_validate_on_a_subset_but_test_means_the_whole_split(tmp_path):
    """--val-samples makes each epoch's validation cheap; the metric recorded as "test" is still the test split."""
    from deploycomp.checkpoint import load_model
    from deploycomp.data import load_dataset
    from deploycomp.train import TrainConfig, evaluate
    from deploycomp.workflows import run_training

    console.set_verbosity(console.QUIET)
    try:
        record = run_training("light_resnet18", TrainConfig(epochs=1, batch_size=32, train_samples=64,
                                                            val_samples=16, seed=0),
                              output=str(tmp_path / "m.pt"), data="synthetic")
    finally:
        console.set_verbosity(console.NORMAL)
    test, _ = load_dataset("synthetic", "test")
    ckpt = load_model(str(tmp_path / "m.pt"))
    assert ckpt.metadata["metrics"]["test"]["samples"] == len(test) > 16
    assert record["test"]["top1_pct"] == evaluate(ckpt.model, test, device="cpu")["top1_pct"]


def test_a_last_batch_of_one_image_is_dropped_not_a_batchnorm_crash():
    import torch
    import torch.nn as nn

    from deploycomp.train import TrainConfig, fit

    class Five:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.full((4,), float(i)), i % 2

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    result = fit(model, Five(), None, TrainConfig(epochs=1, batch_size=4, optimizer="adam", lr=1e-3, device="cpu"))
    assert len(result.history) == 1 and result.history[0]["train_loss"] > 0
