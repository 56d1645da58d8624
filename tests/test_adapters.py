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


def _prune_and_replay(make, x, ratio: float = 0.5):
    """Prune ``make()`` with magnitude at ``ratio``; check that a replay on a fresh one gives the same outputs."""
    from deploycomp.prune.channels import prune_channels
    from deploycomp.prune.criteria import CriterionOptions, get_criterion
    from deploycomp.surgery import replay_channel_pruning

    torch.manual_seed(0)
    model = make().eval()
    history = prune_channels(model, x, get_criterion("magnitude")(CriterionOptions()), ratio)
    torch.manual_seed(0)
    again = make().eval()
    replay_channel_pruning(again, {"history": history}, x)
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    return model


def test_channel_shuffle_adapter_tiny():
    """ShuffleNetV2 at its smallest: pruned, the same on replay, the shuffled block outputs kept."""
    from torchvision.models import ShuffleNetV2

    make = lambda: ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], num_classes=10)  # noqa: E731
    blocks_out = [m.branch2[5].out_channels for m in make().modules() if hasattr(m, "branch2")]
    model = _prune_and_replay(make, torch.randn(2, 3, 32, 32))
    assert [m.branch2[5].out_channels for m in model.modules() if hasattr(m, "branch2")] == blocks_out
    assert model.stage2[0].branch2[0].out_channels < 8 and model.conv5[0].out_channels < 128


def test_swin_window_attention_adapter_tiny():
    """torchvision's Swin (V1 and V2 attention) at toy size: MLPs pruned, qkv and proj kept, fast."""
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2

    for block in ({}, {"block": SwinTransformerBlockV2}):
        make = lambda: SwinTransformer([4, 4], 16, [1, 1], [1, 2], [2, 2], num_classes=10, **block)  # noqa: E731,B023
        model = _prune_and_replay(make, torch.randn(1, 3, 32, 32))
        attn = model.features[1][0].attn
        assert (attn.qkv.out_features, attn.proj.out_features) == (48, 16)
        assert model.features[1][0].mlp[0].out_features < 64


def test_maxvit_adapter_tiny():
    """torchvision's MaxViT at toy size: partitions and attention traced as single ops; MBConv widths pruned."""
    from torchvision.models.maxvit import MaxVit

    make = lambda: MaxVit((32, 32), stem_channels=8, partition_size=2, block_channels=[16], block_layers=[1],  # noqa: E731
                          head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    model = _prune_and_replay(make, torch.randn(1, 3, 32, 32))
    layers = model.blocks[0].layers[0].layers
    assert layers.window_attention.attn_layer[1].to_qkv.out_features == 48
    assert layers.MBconv.layers.conv_b[0].out_channels < 64


def test_csp_split_adapter_tiny():
    """A CSP stage (timm's CrossStage: conv_exp's output split in halves): the split layer keeps its width,
    the widths inside the blocks are pruned, and the split still matches."""
    pytest.importorskip("timm")
    from timm.models.cspnet import CrossStage

    def make():
        stage = CrossStage(8, 16, stride=1, dilation=1, depth=2, block_ratio=1.0, bottle_ratio=0.5,
                           expand_ratio=2.0, block_fn=_bottleneck(), act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), stage, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 10))

    model = _prune_and_replay(make, torch.randn(1, 3, 16, 16))
    stage = model[1]
    assert stage.conv_exp.conv.out_channels == stage.expand_chs == 32
    assert stage.blocks[0].conv1.conv.out_channels < 8


def _bottleneck():
    from timm.models.cspnet import BottleneckBlock

    return BottleneckBlock


def test_res2net_split_adapter_tiny():
    """Res2Net's scales (conv1's output split in equal parts): conv1 keeps its width, the split matches."""
    pytest.importorskip("timm")
    from timm.models.res2net import Bottle2neck

    def make():
        return nn.Sequential(nn.Conv2d(3, 64, 1), Bottle2neck(64, 16, scale=4, norm_layer=nn.BatchNorm2d),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    model = _prune_and_replay(make, torch.randn(1, 3, 8, 8))
    block = model[1]
    assert block.conv1.out_channels == block.width * block.scale


def test_timm_attention_adapter_tiny():
    """timm's ViT at toy size: attention layers (and the residual stream) keep their widths, MLPs are pruned."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    make = lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,  # noqa: E731
                                     num_classes=10)
    model = _prune_and_replay(make, torch.randn(1, 3, 32, 32))
    assert model.blocks[0].attn.qkv.out_features == 96 and model.blocks[0].mlp.fc1.out_features < 128


def test_scaled_std_conv_and_layer_scale_adapters_tiny():
    """NF-net convolutions prune their gain with their output channels; metaformer's layer scale views its
    scale with the pruned width; a GroupNorm without bias prunes."""
    pytest.importorskip("timm")
    from timm.layers.std_conv import ScaledStdConv2d
    from timm.models.metaformer import GroupNorm1NoBias, Scale

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ScaledStdConv2d(3, 16, 3, padding=1)
            self.norm = GroupNorm1NoBias(16)
            self.scale = Scale(16)
            self.b = ScaledStdConv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(self.b(self.scale(self.norm(self.a(x)))).mean((2, 3)))

    model = _prune_and_replay(Net, torch.randn(1, 3, 8, 8))
    assert model.a.out_channels < 16 and model.a.gain.shape[0] == model.a.out_channels
    assert model.scale.shape[0] == model.scale.scale.numel() == model.a.out_channels


def test_refusal_is_fast_and_one_line(cli):
    """A pattern whose dependency graph would take minutes or GiB is refused before any graph is built."""
    import time

    pytest.importorskip("timm")
    t = time.perf_counter()
    result = cli("prune", "--model", "timm:lambda_resnet26t", "--num-classes", "10", "--input-size", "64", *PRUNE,
                 "-o", "l.pt", ok=False)
    assert_one_line_error(result, "cannot prune timm:lambda_resnet26t", "LambdaLayer", "--method depth")
    assert time.perf_counter() - t < 60


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
