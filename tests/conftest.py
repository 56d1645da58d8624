"""Shared fixtures: small real data, a tiny trained checkpoint, and an isolated CLI runner."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest

FMNIST_DIR = Path(os.environ.get("DEPLOYCOMP_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
HAS_FMNIST = (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").exists() or (FMNIST_DIR / "t10k-images-idx3-ubyte").exists()

needs_fmnist = pytest.mark.skipif(not HAS_FMNIST, reason=f"Fashion-MNIST not installed in {FMNIST_DIR} "
                                  "(apt-get install dataset-fashion-mnist)")


def pytest_collection_modifyitems(config, items):
    """Skip hardware tests with a reason when the hardware or library is absent."""
    import importlib.util

    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none here"))
        if "tensorrt" in item.keywords and not (has_trt and has_cuda):
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a GPU; TensorRT is not installed here"))


@pytest.fixture(autouse=True)
def _threads():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture()
def one_torch_thread():
    """Tiny models on a shared two-core machine: one thread is faster than two spinning ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A user's own model code (file.py:factory), as `--model user_net.py:build` takes it.
USER_NET = """
import torch.nn as nn


def build(num_classes=10, width=8, in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


build.input_size = (3, 24, 24)


def fixed():
    return build(num_classes=5)


def not_a_model(num_classes=10):
    return "hello"
"""


@pytest.fixture()
def net_file(tmp_path) -> Path:
    """``tmp_path/user_net.py`` holding :data:`USER_NET` (``build`` is a 24 px, 10-class model by default)."""
    path = tmp_path / "user_net.py"
    path.write_text(USER_NET)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """light_resnet18 trained for one epoch on 1,024 Fashion-MNIST images (a few seconds on CPU).

    Real weights and real metadata, but far from converged: use it for structure and plumbing tests.
    """
    if not HAS_FMNIST:
        pytest.skip(reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from deploycomp import console
    from deploycomp.train import TrainConfig
    from deploycomp.workflows import run_training

    console.set_verbosity(console.QUIET)
    out = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    run_training("light_resnet18", TrainConfig(epochs=1, batch_size=64, train_samples=1024, seed=0),
                 output=str(out), data="fashion-mnist")
    console.set_verbosity(console.NORMAL)
    return out


@pytest.fixture()
def cli(tmp_path, monkeypatch):
    """Run ``deploycomp ARGS`` in an isolated directory; returns the click Result."""
    from click.testing import CliRunner

    from deploycomp.cli import cli as group

    monkeypatch.chdir(tmp_path)

    def run(*args, ok: bool = True):
        result = CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=True)
        if result.exception and not isinstance(result.exception, SystemExit):
            tb = "".join(traceback.format_exception(result.exception))
            raise AssertionError(f"deploycomp {' '.join(map(str, args))} raised:\n{tb}\n{result.output}")
        if ok and result.exit_code != 0:
            raise AssertionError(f"deploycomp {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}")
        return result

    return run


def assert_one_line_error(result, *fragments: str) -> None:
    """A user mistake: non-zero exit, one 'Error: ...' line naming the problem, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for f in fragments:
        assert f in errors[0], f"{f!r} not in {errors[0]!r}"


@pytest.fixture()
def quiet_console():
    """Results and warnings only (no progress lines) for one test; verbosity restored after it."""
    from deploycomp import console

    console.set_verbosity(console.QUIET)
    yield
    console.set_verbosity(console.NORMAL)
