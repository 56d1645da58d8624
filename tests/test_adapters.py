"""Pruning adapters (deploycomp.prune.adapters) on tiny instances of each structural pattern, and the one-line
errors of what torch-pruning or an ONNX exporter cannot do, through the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.conftest import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRUNE = ("--data", "synthetic", "--method", "magnitude", "--ratio", "0.3", "--round-to", "1")


SHUFFLE_NET = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    """Two convolutions with a channel shuffle between them, and no adapter: torch-pruning maps it wrongly."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.a(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.fc(self.b(x).mean((2, 3)))
'''


def test_cli_torch_pruning_failure_is_one_line(cli, tmp_path):
    """A pattern torch-pruning cannot trace (a raw channel shuffle in user code) ends in one line naming the
    model, what stopped it and the nearest workaround; -v keeps the traceback."""
    (tmp_path / "shuffle_net.py").write_text(SHUFFLE_NET)
    args = ("prune", "--model", "shuffle_net.py:Net", *PRUNE, "--input-size", "16", "-o", "p.pt")
    result = cli(*args, ok=False)
    assert_one_line_error(result, "cannot prune shuffle_net.py:Net", "torch-pruning failed", "--ignore")
    assert result.exit_code == 1
    assert not (tmp_path / "p.pt").exists()
    verbose = cli(*args, "-v", ok=False)
    assert "Traceback" in verbose.output


def test_cli_shufflenet_prunes_and_exports(cli, tmp_path):
    """torchvision's ShuffleNetV2 (channel shuffle adapter): prune, then export with ONNX Runtime parity."""
    result = cli("prune", "--model", "shufflenet_v2_x0_5", "--num-classes", "10", "--input-size", "64", *PRUNE,
                 "-o", "s.pt")
    assert "Traceback" not in result.output
    cli("export", "--model", "s.pt", "--data", "synthetic", "-o", "s.onnx")
    assert (tmp_path / "s.onnx").exists()


def test_cli_export_failure_prints_no_graph(cli, capfd):
    """alexnet at 64 px: the TorchScript exporter's graph dump (written by C++ to the file descriptors) is
    captured; one line says what stopped it and suggests a larger --input-size or the other exporter."""
    result = cli("export", "--model", "alexnet", "--num-classes", "10", "--data", "synthetic", "--input-size", "64",
                 "-o", "a.onnx", ok=False)
    assert_one_line_error(result, "cannot export alexnet", "64x64", "adaptive_avg_pool2d", "--input-size",
                          "--exporter dynamo")
    assert result.exit_code == 2
    native = capfd.readouterr()
    assert "graph(" not in native.out + native.err + result.output
    assert len(result.output.strip().splitlines()) <= 3, result.output


def test_channel_shuffle_adapter_tiny():
    """ShuffleNetV2 at its smallest: pruned, the same on replay, the shuffled block outputs kept."""
    from torchvision.models import ShuffleNetV2

    from deploycomp.prune.channels import prune_channels
    from deploycomp.prune.criteria import CriterionOptions, get_criterion
    from deploycomp.surgery import replay_channel_pruning

    def make():
        torch.manual_seed(0)
        return ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10).eval()

    model, x = make(), torch.randn(2, 3, 32, 32)
    blocks_out = [m.branch2[5].out_channels for m in model.modules() if hasattr(m, "branch2")]
    history = prune_channels(model, x, get_criterion("magnitude")(CriterionOptions()), 0.5)
    assert [m.branch2[5].out_channels for m in model.modules() if hasattr(m, "branch2")] == blocks_out
    assert model.stage2[0].branch2[0].out_channels < 8 and model.conv5[0].out_channels < 128
    again = make()
    replay_channel_pruning(again, {"history": history}, x)
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_broken_pruned_model_is_refused(monkeypatch):
    """A pruned model that no longer runs (a stale fixed split) is a PruningError, not a shape error later."""
    from deploycomp.prune.adapters import PruningError
    from deploycomp.prune.channels import prune_channels
    from deploycomp.prune.criteria import CriterionOptions, get_criterion

    class StaleSplit(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 1)
            self.b = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            left, right = self.a(x).split(8, dim=1)  # fixed size: pruning `a` breaks it
            return self.fc(torch.cat((left, self.b(right)), 1).mean((2, 3)))

    with pytest.raises(PruningError, match="running the pruned model"):
        prune_channels(StaleSplit().eval(), torch.randn(1, 3, 8, 8), get_criterion("magnitude")(CriterionOptions()),
                       0.5)
