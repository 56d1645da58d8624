"""Structured pruning: conformance over criteria x models, per-criterion rankings, rounding, targets, CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from deploycomp.checkpoint import load_model
from deploycomp.data import load_dataset
from deploycomp.errors import UnknownNameError, UsageError
from deploycomp.inputs import Data
from deploycomp.metrics import count_macs, layer_channels
from deploycomp.prune import PruneConfig, prune_channels, prune_checkpoint
from deploycomp.prune import calibrate as cal
from deploycomp.prune.criteria import CRITERIA, CriterionOptions, get_criterion, interleave
from deploycomp.prune.depth import block_sensitivity, removable_blocks
from deploycomp.train import TrainConfig
from tests.conftest import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def synthetic(size: int = 32) -> Data:
    test, info = load_dataset("synthetic", "test", input_size=(size, size))
    train, _ = load_dataset("synthetic", "train", input_size=(size, size))
    return Data(info, test, train)


def quick(method: str, **kw) -> PruneConfig:
    base = dict(method=method, ratio=0.3, round_to=1, calib_samples=16, calib_batch=8, finetune=None, eval_samples=16)
    return PruneConfig(**{**base, **kw})


def assert_conforms(ckpt, pruned, record, tmp_path) -> None:
    """Forward works, output shape unchanged, reported channels = modules, reload gives identical outputs."""
    x = torch.randn(2, *pruned.input_shape)
    model = pruned.model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, ckpt.num_classes)
    assert record["layers"] == layer_channels(model)
    modules = dict(model.named_modules())
    for row in record["layers"]:
        m = modules[row["layer"]]
        assert row["out"] == getattr(m, "out_channels", getattr(m, "out_features", None))
    path = tmp_path / "pruned.pt"
    pruned.save(path)
    again = load_model(str(path))
    with torch.no_grad():
        assert torch.equal(again.model.eval()(x), y)
    assert again.metadata["lineage"][-1]["op"] == "prune"


# -- conformance: criteria x models ----------------------------------------------------------------

# light_resnet18 runs every criterion as the baseline below; MobileNetV2 (depthwise convolutions, inverted
# residuals) the criteria that read its layers differently; VGG the relevance study's criteria.
SMALL_CASES = [("mobilenet_v2", m) for m in ("magnitude", "taylor", "wanda", "coverage", "lrp", "depth")] + \
    [("vgg16_bn_cifar", m) for m in ("lrp", "hybrid", "slimming", "depth")]


@pytest.mark.parametrize(("arch", "method"), SMALL_CASES)
def test_conformance_small_models(arch, method, tmp_path):
    """Criteria on small architectures (VGG has no residual blocks: depth must refuse)."""
    ckpt = load_model(arch, num_classes=10, in_channels=3, input_size=(32, 32))
    if method == "depth" and not removable_blocks(ckpt.model):
        with pytest.raises(UsageError, match="no residual blocks"):
            prune_checkpoint(ckpt, synthetic(), quick(method))
        return
    pruned, record = prune_checkpoint(ckpt, synthetic(), quick(method))
    assert record["after"]["macs"] < record["before"]["macs"]
    assert_conforms(ckpt, pruned, record, tmp_path)


@pytest.fixture(scope="module")
def fmnist(tiny_checkpoint) -> Data:
    test, info = load_dataset("fashion-mnist", "test")
    return Data(info, test, train=load_dataset("fashion-mnist", "train")[0])


@pytest.mark.parametrize("method", CRITERIA.names())
def test_conformance_baseline(tiny_checkpoint, fmnist, method, tmp_path):
    """The shipped baseline's architecture and data (the tiny Fashion-MNIST checkpoint stands in for it)."""
    ckpt = load_model(str(tiny_checkpoint))
    pruned, record = prune_checkpoint(ckpt, fmnist, quick(method))
    assert_conforms(ckpt, pruned, record, tmp_path)


@pytest.mark.parametrize(("arch", "methods"), [
    ("resnet18", ["lrp", "depth"]),
    ("resnet34", ["taylor"]),
    ("resnet50", ["wanda"]),
    pytest.param("vgg16_bn", ["magnitude"], marks=pytest.mark.slow),  # 100 M-parameter classifier: ~15 s
])
def test_conformance_torchvision(arch, methods, tmp_path):
    """The big torchvision models at 32 px: a sample of criteria (the small models run them all)."""
    data = synthetic(32)
    for method in methods:
        ckpt = load_model(arch, num_classes=10, in_channels=3, input_size=(32, 32))
        pruned, record = prune_checkpoint(ckpt, data, quick(method, ratio=0.2, calib_samples=8))
        assert_conforms(ckpt, pruned, record, tmp_path)


def test_pruned_twice_reloads_and_exports_to_onnx(tiny_checkpoint, fmnist, tmp_path):
    """Channel pruning then depth pruning: both surgeries replay in order, and ONNX export needs nothing special."""
    from deploycomp.export import export_onnx

    once, _ = prune_checkpoint(load_model(str(tiny_checkpoint)), fmnist, quick("magnitude", round_to=8))
    once.save(tmp_path / "once.pt")
    twice, record = prune_checkpoint(load_model(str(tmp_path / "once.pt")), fmnist, quick("depth", ratio=0.2))
    assert [s["op"] for s in twice.surgeries] == ["prune_channels", "drop_blocks"]
    assert [e["op"] for e in twice.metadata["lineage"]][-2:] == ["prune", "prune"]
    assert_conforms(once, twice, record, tmp_path)
    twice.save(tmp_path / "twice.pt")
    export_onnx(load_model(str(tmp_path / "twice.pt")), tmp_path / "twice.onnx", dataset=fmnist.test)
    assert (tmp_path / "twice.onnx").exists()


# -- rankings on constructed weights and activations -----------------------------------------------


class Tiny(nn.Sequential):
    """conv(3->4) bn relu conv(4->4) bn relu pool fc(4->2): the group of conv1's outputs has 4 channels."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def first_group(model):
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 8, 8))
    return dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(4)))


def batches(n=3, bs=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 3, 8, 8, generator=g), torch.randint(0, 2, (bs,), generator=g)) for _ in range(n)]


def dead_channel_model(dead: int = 1):
    """Channel ``dead`` of the first block never activates: BN scale 0, bias -1, then ReLU."""
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():
        model[1].weight[dead] = 0.0
        model[1].bias[dead] = -1.0
    return model


def scores(method, model, data=None, **options):
    crit = get_criterion(method)(CriterionOptions(**options))
    if data is not None:
        crit.calibrate(model, data)
    return crit(first_group(model))


def test_magnitude_tiny_weights_first():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model[0].weight[2] *= 1e-3
        model[1].weight[2] = 1e-3
        model[3].weight[:, 2] *= 1e-3
    for norm in ("l1", "l2"):
        assert int(scores("magnitude", model, norm=norm).argmin()) == 2


@pytest.mark.parametrize("method", ["wanda", "coverage"])
def test_zero_activation_channel_first(method):
    s = scores(method, dead_channel_model(1), batches())
    assert int(s.argmin()) == 1 and float(s[1]) == 0.0


def test_taylor_zero_gradient_channel_first():
    s = scores("taylor", dead_channel_model(2), batches())
    assert int(s.argmin()) == 2 and float(s[2]) == 0.0


def test_lrp_dead_channel_gets_no_relevance():
    model = dead_channel_model(3)
    cal.clear_stats(model)
    s = scores("lrp", model, batches())
    assert float(s[3]) == 0.0 and bool((s != 0).any())


def test_wanda_accumulates_over_all_batches():
    model = dead_channel_model(1)
    data = batches(3)
    cal.collect_activations(model, data)
    several = cal.stats(model[3])["act_sq"].clone()
    cal.clear_stats(model)
    cal.collect_activations(model, [(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data]))])
    assert torch.allclose(several, cal.stats(model[3])["act_sq"], rtol=1e-5)
    cal.clear_stats(model)
    cal.collect_activations(model, data[-1:])
    assert not torch.allclose(several, cal.stats(model[3])["act_sq"])


def test_coverage_threshold_matters():
    model = dead_channel_model(1)
    low = scores("coverage", model, batches(), coverage_threshold=0.0)
    cal.clear_stats(model)
    high = scores("coverage", model, batches(), coverage_threshold=0.9)
    assert float(low.sum()) > float(high.sum())


def test_slimming_smallest_gamma_first_and_warns(capsys):
    from types import SimpleNamespace

    model = Tiny()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, 0.4, -0.01, 0.3]))
    assert int(scores("slimming", model).argmin()) == 2
    get_criterion("slimming")().check(SimpleNamespace(metadata={"lineage": [{"op": "train", "params": {}}]}))
    assert "sparsity" in capsys.readouterr().err
    get_criterion("slimming")().check(SimpleNamespace(metadata={"lineage": [{"op": "train",
                                                                              "params": {"sparsity": 1e-4}}]}))
    assert capsys.readouterr().err == ""


def test_batchnorm_recalibration_measures_the_calibration_data():
    model = Tiny().eval()
    data = batches(2)
    cal.recalibrate_batchnorm(model, data)
    x = torch.cat([x for x, _ in data])
    with torch.no_grad():
        expected = model[0](x).mean(dim=(0, 2, 3))
    assert torch.allclose(model[1].running_mean, expected, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


def test_interleave_alternates():
    assert interleave([0, 1, 2, 3], [3, 2, 1, 0]) == [0, 3, 1, 2]
    assert interleave([0, 1, 2], [0, 2, 1]) == [0, 1, 2]


def test_hybrid_alternates_relevance_and_magnitude():
    model = Tiny()
    scale = torch.tensor([4.0, 3.0, 2.0, 1.0])  # magnitude order: 3, 2, 1, 0
    with torch.no_grad():
        model[0].weight.copy_(scale.view(4, 1, 1, 1).expand_as(model[0].weight))
        model[1].weight.copy_(scale)
        model[3].weight.copy_(scale.view(1, 4, 1, 1).expand_as(model[3].weight))
    cal.stats(model[3])["relevance"] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # relevance order: 0, 1, 2, 3
    crit = get_criterion("hybrid")()
    order = torch.argsort(crit(first_group(model))).tolist()
    assert order == [0, 3, 1, 2]


def test_random_is_reproducible():
    a, b = get_criterion("random")(CriterionOptions(seed=1)), get_criterion("random")(CriterionOptions(seed=1))
    group = first_group(Tiny())
    assert torch.equal(a(group), b(group))
    a(group)  # a further pass draws new numbers; reset() starts over
    a.reset()
    b.reset()
    assert torch.equal(a(group), b(group))


def test_depth_skippable_block_has_zero_sensitivity():
    ckpt = load_model("light_resnet18", num_classes=10, in_channels=3, input_size=(32, 32))
    model = ckpt.model.eval()
    with torch.no_grad():
        model.layer2[1].bn2.weight.zero_()
        model.layer2[1].bn2.bias.zero_()
    names = removable_blocks(model)
    assert names == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    sens = block_sensitivity(model, names, [(torch.randn(8, 3, 32, 32), torch.arange(8))])
    assert abs(sens["layer2.1"]) < 1e-6


# -- global vs layer-wise, rounding, targets -------------------------------------------------------


class TwoLayers(nn.Sequential):
    def __init__(self, a: int = 8, b: int = 8):
        super().__init__(nn.Conv2d(3, a, 3, padding=1), nn.BatchNorm2d(a), nn.ReLU(), nn.Conv2d(a, b, 3, padding=1),
                         nn.BatchNorm2d(b), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b, 2))


def widths(model) -> tuple[int, int]:
    return model[0].out_channels, model[3].out_channels


def test_global_differs_from_layerwise():
    def build():
        torch.manual_seed(0)
        m = TwoLayers()
        with torch.no_grad():  # layer A: three nearly dead channels; layer B: all alike
            m[0].weight.copy_(m[0].weight.sign())
            m[3].weight.copy_(m[3].weight.sign() * (1 + 0.01 * torch.arange(8.0)).view(8, 1, 1, 1))
            m[8].weight.copy_(m[8].weight.sign())
            for c in (1, 4, 6):
                m[0].weight[c] *= 1e-3
                m[1].weight[c] = 1e-3
                m[3].weight[:, c] *= 1e-3
        return m

    x = torch.zeros(1, 3, 8, 8)
    local, glob = build(), build()
    prune_channels(local, x, get_criterion("magnitude")(), 0.25)
    prune_channels(glob, x, get_criterion("magnitude")(), 0.25, global_pruning=True)
    assert widths(local) == (6, 6)
    assert widths(glob) == (5, 7)


def test_rounding_exact_counts():
    x = torch.zeros(1, 3, 8, 8)
    m = TwoLayers(32, 64)
    prune_channels(m, x, get_criterion("magnitude")(), 0.3, round_to=1)
    assert widths(m) == (22, 44)  # int(32 * 0.7), int(64 * 0.7): torch-pruning keeps the floor of the exact count
    m = TwoLayers(32, 64)
    prune_channels(m, x, get_criterion("magnitude")(), 0.3, round_to=8)
    # torch-pruning alone would keep 16 and 40 (both rounded down); balanced rounding keeps 24 and 40
    assert widths(m) == (24, 40)
    m = TwoLayers(8, 64)
    prune_channels(m, x, get_criterion("magnitude")(), 0.9, round_to=8)
    assert widths(m)[0] == 8  # never below round_to (torch-pruning would drop to 0 and skip the layer)
    assert m[8].out_features == 2  # the classifier's outputs are never pruned


@pytest.fixture(scope="module")
def light():
    return load_model("light_resnet18", num_classes=10, in_channels=3, input_size=(32, 32))


def fresh(light):
    import copy

    return copy.deepcopy(light)


def test_ratio_with_rounding_lands_within_three_points(light):
    pruned, record = prune_checkpoint(fresh(light), synthetic(), quick("magnitude", ratio=0.1, round_to=8))
    assert abs(record["macs_reduction_pct"] - record["macs_reduction_asked_pct"]) <= 3.0
    assert 15 < record["macs_reduction_asked_pct"] < 23  # about 1 - 0.9^2
    assert all(r["out"] % 8 == 0 for r in record["layers"][:-1])


@pytest.mark.parametrize("kind", ["macs", "speedup"])
def test_targets_reached_within_two_percent(light, kind):
    macs0 = count_macs(light.model, light.example_input())
    target = {"target_macs_g": macs0 * 0.55 / 1e9} if kind == "macs" else {"target_speedup": 2.0}
    pruned, record = prune_checkpoint(fresh(light), synthetic(), quick("magnitude", ratio=None, round_to=8, **target))
    goal = macs0 * 0.55 if kind == "macs" else macs0 / 2
    assert abs(record["after"]["macs"] - goal) / goal <= 0.02


def test_iterative_steps_and_global(light):
    pruned, record = prune_checkpoint(fresh(light), synthetic(), quick("taylor", steps=2, global_pruning=True))
    assert len(record["steps"]) == 2 and len(pruned.surgeries) == 2
    assert abs(record["macs_reduction_pct"] - record["macs_reduction_asked_pct"]) <= 3.0


def test_ignored_layer_keeps_its_outputs(light):
    pruned, record = prune_checkpoint(fresh(light), synthetic(), quick("magnitude", ignore=("layer2.0.conv1",)))
    model = pruned.model
    assert model.layer2[0].conv1.out_channels == light.model.layer2[0].conv1.out_channels
    assert model.layer3[0].conv1.out_channels < light.model.layer3[0].conv1.out_channels
    assert record["params"]["ignore"] == ["layer2.0.conv1"]


def test_depth_ratio_and_reload(light, tmp_path):
    pruned, record = prune_checkpoint(fresh(light), synthetic(), quick("depth", ratio=0.4))
    assert len(record["removed_blocks"]) == 2  # 0.4 x 5 removable blocks
    assert pruned.surgeries[-1] == {"op": "drop_blocks", "blocks": record["removed_blocks"]}
    assert_conforms(light, pruned, record, tmp_path)


def test_errors(light):
    data = synthetic()
    for cfg, fragment in [
        (quick("magnitude", ratio=1.0), "--ratio must be in (0, 1)"),
        (quick("magnitude", ratio=0.0), "--ratio must be in (0, 1)"),
        (quick("magnitude", target_macs_g=0.01), "not --ratio and --target-macs"),
        (quick("magnitude", ratio=None, target_macs_g=1e-6), "unreachable"),
        (quick("magnitude", ratio=None, target_macs_g=100.0), "not below"),
        (quick("taylor", calib_samples=10_000), "exceeds"),
        (quick("depth", ratio=None, target_macs_g=1e-6), "unreachable"),
        (quick("magnitude", distill_from="teacher.pt"), "--distill-from distils during fine-tuning"),
    ]:
        with pytest.raises(UsageError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            prune_checkpoint(fresh(light), data, cfg)
    with pytest.raises(UnknownNameError) as e:
        prune_checkpoint(fresh(light), data, quick("tayler"))
    assert e.value.closest == "taylor"


# -- accuracy does not collapse; the CLI -----------------------------------------------------------


def test_accuracy_does_not_collapse(tiny_checkpoint, fmnist):
    """Right after pruning 10 % by magnitude (no fine-tuning) the model still predicts what it predicted.

    A bug in BatchNorm statistics, channel order or the head drops a model to chance (10 %), as in the
    network-slimming report. The shipped baseline (about 90 %) must keep most of its above-chance
    accuracy; the barely trained tiny checkpoint (when the baseline is absent) must keep its predictions.
    """
    import copy

    from deploycomp.checkpoint import default_model

    baseline = Path(default_model()).exists()
    ckpt = load_model(default_model() if baseline else str(tiny_checkpoint))
    original = copy.deepcopy(ckpt.model).eval()
    pruned, record = prune_checkpoint(ckpt, fmnist, PruneConfig(method="magnitude", ratio=0.1, finetune=None,
                                                                eval_samples=1000))
    x = torch.stack([fmnist.test[i][0] for i in range(512)])
    with torch.no_grad():
        agree = (original(x).argmax(1) == pruned.model.eval()(x).argmax(1)).float().mean().item()
    assert agree > 0.5, agree  # chance would be about 0.1
    before, after = record["accuracy"]["before"]["top1_pct"], record["accuracy"]["after_pruning"]["top1_pct"]
    if baseline:
        assert after - 10 > 0.8 * (before - 10), (before, after)


def test_cli_writes_checkpoint_record_and_summary(cli, tiny_checkpoint, tmp_path):
    r = cli("prune", "-m", tiny_checkpoint, "--method", "taylor", "--ratio", "0.2", "--calib-samples", 64,
            "--finetune-epochs", 1, "--train-samples", 128, "--eval-samples", 200)
    out = tmp_path / "tiny-pruned-taylor.pt"
    assert out.exists() and (tmp_path / "tiny-pruned-taylor.pt.json").exists()
    for label in ("params", "size (MiB)", "MACs (G)", "right after pruning", "after fine-tuning", "calibration",
                  "fine-tuning"):
        assert label in r.stdout
    record = json.loads((tmp_path / "tiny-pruned-taylor.pt.json").read_text())
    assert record["params"]["finetune"]["epochs"] == 1 and record["params"]["finetune"]["lr"] == 0.01
    assert record["seconds"]["finetuning"] > 0
    ckpt = load_model(str(out))
    assert ckpt.metadata["lineage"][-1]["params"]["method"] == "taylor"
    assert ckpt.metadata["metrics"]["test"]["top1_pct"] == record["accuracy"]["after_finetuning"]["top1_pct"]


def test_cli_distill_from_teacher(cli, tiny_checkpoint, tmp_path):
    cli("prune", "-m", tiny_checkpoint, "--method", "magnitude", "--ratio", "0.2", "--distill-from", tiny_checkpoint,
        "--temperature", 3, "--alpha", 0.7, "--lambda", 0.3, "--train-samples", 64, "--eval-samples", 64, "-o", "kd.pt")
    lineage = load_model(str(tmp_path / "kd.pt")).metadata["lineage"][-1]["params"]
    assert lineage["distill_from"] == str(tiny_checkpoint) and lineage["temperature"] == 3


@pytest.mark.parametrize(("args", "fragments"), [
    (["--method", "magnitude", "--ratio", "1.5"], ["--ratio must be in (0, 1)"]),
    (["--method", "magnitud", "--ratio", "0.1"], ["unknown pruning criterion", "'magnitude'"]),
    (["--method", "taylor", "--ratio", "0.1", "--calib-samples", "100000"], ["--calib-samples 100000 exceeds"]),
    (["--method", "magnitude", "--target-macs", "0.000001"], ["unreachable"]),
    (["--method", "magnitude", "--ratio", "0.1", "--target-speedup", "2"], ["not --ratio and --target-speedup"]),
    (["--method", "magnitude", "--ratio", "0.1", "--ignore", "layer9"], ["--ignore 'layer9'"]),
])
def test_cli_errors_one_line_nothing_written(cli, tiny_checkpoint, tmp_path, args, fragments):
    r = cli("prune", "-m", tiny_checkpoint, *args, "--eval-samples", 16, ok=False)
    assert_one_line_error(r, *fragments)
    assert not list(tmp_path.glob("*pruned*"))


# -- data-free pruning: synthetic data teaches nothing --------------------------------------------


def test_synthetic_data_recalibrates_and_warns_only_where_it_must(light, capsys):
    """On synthetic data BatchNorm keeps its statistics; only data-driven criteria warn about calibrating."""
    from deploycomp.prune.criteria import CRITERIA

    ckpt = fresh(light)
    bn = ckpt.model.bn1
    bn.running_mean.fill_(0.25)
    pruned, record = prune_checkpoint(ckpt, synthetic(), quick("magnitude", eval_samples=None))
    assert record["params"]["recalibrate_bn"] is False and record["accuracy"]["before"] is None
    assert "calibrating" not in capsys.readouterr().err
    kept = pruned.model.bn1.running_mean
    assert torch.all(kept == 0.25)  # the surviving channels keep the model's own statistics
    for name in ("random", "taylor"):
        prune_checkpoint(fresh(light), synthetic(), quick(name, eval_samples=None))
        warned = "calibrating" in capsys.readouterr().err
        assert warned == CRITERIA.get(name).needs_data, name
    with pytest.raises(UsageError, match="--recalibrate-bn re-estimates BatchNorm statistics"):
        prune_checkpoint(fresh(light), synthetic(), quick("magnitude", recalibrate_bn=True))
    ft = quick("magnitude", finetune=TrainConfig(epochs=1, train_samples=16, batch_size=8),
               finetune_on_synthetic=False)
    _, record = prune_checkpoint(fresh(light), synthetic(), ft)
    assert record["params"]["finetune"] is None and record["seconds"]["finetuning"] == 0
    with pytest.raises(UsageError, match="--distill-from distils while fine-tuning"):  # it would be ignored
        prune_checkpoint(fresh(light), synthetic(), quick("magnitude", finetune=ft.finetune, distill_from="x.pt",
                                                          finetune_on_synthetic=False))


def test_cli_data_free_pruning_of_a_torchvision_model(cli, tmp_path):
    """The TS3 command at a small input size: 1000 classes, synthetic data shaped like the model, no training."""
    r = cli("prune", "--model", "resnet18", "--num-classes", "1000", "--input-size", "64", "--data", "synthetic",
            "--method", "magnitude", "--ratio", "0.1", "--round-to", "1", "-o", "r18.pt", "--json")
    record = json.loads(r.stdout)
    assert record["synthetic"] and record["params"]["finetune"] is None and not record["params"]["recalibrate_bn"]
    assert record["accuracy"] == {"before": None, "after_pruning": None, "after_finetuning": None}
    assert "calibrating" not in r.stderr and "no fine-tuning" in r.stderr
    assert 17 < record["macs_reduction_pct"] < 21  # about 1 - 0.9^2
    info = json.loads(cli("info", "-m", "r18.pt", "--json").stdout)
    assert info["input_shape"] == [3, 64, 64] and info["params_total"] == record["after"]["params_total"]
    ckpt = load_model(str(tmp_path / "r18.pt"))
    assert ckpt.num_classes == 1000 and ckpt.model.fc.out_features == 1000


def test_cli_reproduces_ts3_resnet50(cli):
    """TS3: ResNet-50, 10 % layer-wise magnitude, exact counts: 4.12 -> 3.334 G MACs, 97.8 -> 79.8 MiB."""
    cli("prune", "--model", "resnet50", "--num-classes", "1000", "--input-size", "224", "--data", "synthetic",
        "--method", "magnitude", "--ratio", "0.1", "--round-to", "1", "--finetune-epochs", "0", "-q")
    info = json.loads(cli("info", "-m", "resnet50-pruned-magnitude.pt", "--json").stdout)
    assert info["params_total"] == 20_837_770  # benchmarks/results/prune_resnet50_ts3.md, round_to 1
    assert info["macs_g"] == pytest.approx(3.334, abs=5e-4)
    assert info["weights_size_mib"] == pytest.approx(79.76, abs=0.01)
