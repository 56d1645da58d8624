"""The command line: start-up cost, help, version, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deploycomp import __version__
from deploycomp.cli import COMMANDS
from tests.conftest import assert_one_line_error, needs_fmnist


def test_help_imports_no_torch():
    code = ("import sys\nfrom deploycomp.cli import cli, COMMANDS\n"
            "for args in [['--help']] + [[c, '--help'] for c in COMMANDS]:\n"
            "    try:\n        cli.main(args, prog_name='deploycomp')\n    except SystemExit as e:\n"
            "        assert e.code == 0, (args, e.code)\n"
            "heavy = [m for m in ('torch', 'torchvision', 'onnx', 'onnxruntime', 'numpy', 'torch_pruning') "
            "if m in sys.modules]\nprint('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_version(cli):
    assert cli("--version").output.strip().endswith(__version__)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(cli, command):
    result = cli(command, "--help")
    assert "Usage: " in result.output and command in result.output


def test_unknown_command_suggests(cli):
    result = cli("evl", ok=False)
    assert result.exit_code == 2
    assert "did you mean 'eval'" in result.output.lower()


def test_missing_model_file(cli):
    assert_one_line_error(cli("eval", "-m", "missing.pt", ok=False), "missing.pt", "does not exist")


def test_unknown_model_name_suggests_closest(cli):
    assert_one_line_error(cli("info", "-m", "resnet51", ok=False), "unknown model 'resnet51'", "resnet50")


def test_unknown_dataset(cli):
    assert_one_line_error(cli("eval", "-m", "light_resnet18", "-d", "fashion-mnst", ok=False),
                          "unknown dataset", "fashion-mnist")


def test_bad_numbers(cli):
    result = cli("train", "-m", "light_resnet18", "--epochs", "0", ok=False)
    assert result.exit_code == 2 and "Traceback" not in result.output and "--epochs" in result.output
    assert_one_line_error(cli("info", "-m", "light_resnet18", "--input-size", "abc", ok=False), "--input-size")


def test_corrupt_checkpoint(cli, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(cli("eval", "-m", bad, ok=False), "bad.pt", "not a readable")


def test_info_json(cli):
    report = json.loads(cli("info", "-m", "light_resnet18", "--in-channels", "1", "--input-size", "28",
                            "--json").stdout)
    assert report["params_total"] == 2_797_034
    assert report["flops_g"] == pytest.approx(2 * report["macs_g"])
    assert report["input_shape"] == [1, 28, 28]
    assert report["memory"]["params_size_mib"] == pytest.approx(2_797_034 * 4 / 2**20, rel=1e-6)


def test_list_models_and_datasets(cli):
    out = cli("info", "--list-models", "--list-datasets").output
    for name in ("light_resnet18", "vgg16_bn_cifar", "resnet18_small", "resnet50", "fashion-mnist", "synthetic"):
        assert name in out


@needs_fmnist
def test_train_eval_info_roundtrip(cli, tmp_path):
    out = tmp_path / "m.pt"
    cli("-q", "train", "-m", "light_resnet18", "--epochs", "1", "--train-samples", "256", "--val-samples", "500",
        "--batch-size", "64", "-o", out)
    assert out.exists() and (tmp_path / "m.pt.json").exists()
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "m.pt.resume.pt").exists()
    record = json.loads((tmp_path / "m.pt.json").read_text())
    assert record["params"]["epochs"] == 1 and record["params"]["dataset"] == "fashion-mnist"
    assert record["params"]["val_samples"] == 500
    result = json.loads(cli("eval", "-m", out, "--samples", "200", "--json").stdout)
    assert result["samples"] == 200 and result["dataset"] == "fashion-mnist"
    # A command never overwrites its own input.
    assert_one_line_error(cli("train", "-m", out, "--epochs", "1", "-o", out, ok=False), "own input")
