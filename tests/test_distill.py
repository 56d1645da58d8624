"""Knowledge distillation, stochastic depth and freezing (issue 4)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from deploycomp.distill import (
    apply_stochastic_depth,
    freeze,
    freeze_checkpoint,
    kd_loss,
    remove_stochastic_depth,
    residual_blocks,
    survival_probabilities,
    unfreeze,
)
from deploycomp.errors import UsageError
from deploycomp.zoo import build_model
from tests.conftest import assert_one_line_error, needs_fmnist

FAST = ["--data", "synthetic", "--epochs", 1, "--train-samples", 64, "--batch-size", 32]


class FixedTeacher(nn.Module):
    """Returns fixed logits whatever the input; records its mode and whether grad was enabled."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.logits.expand(len(x), -1) * 1.0


# -- the KD loss ------------------------------------------------------------------------------------


def _softmax(v, t):
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def test_kd_loss_matches_hand_computed_value():
    s, t, y, temp = [1.0, 2.0, 0.0], [2.0, 0.0, 1.0], 1, 2.0
    p_t, p_s = _softmax(t, temp), _softmax(s, temp)
    kl = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))  # KL(teacher || student) = 0.22051...
    ce = -math.log(_softmax(s, 1.0)[y])  # 0.40761...
    expected = 0.7 * temp**2 * kl + 0.3 * ce
    assert expected == pytest.approx(0.73972215, abs=1e-7)
    loss = kd_loss(FixedTeacher([t]), temperature=temp, alpha=0.7, lam=0.3)
    got = loss(torch.tensor([s]), torch.zeros(1, 3), torch.tensor([y]))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy():
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    teacher = FixedTeacher(torch.randn(1, 10))
    got = kd_loss(teacher, temperature=3.0, alpha=0.0, lam=1.0)(logits, torch.zeros(16, 3), y)
    assert torch.allclose(got, F.cross_entropy(logits, y))


def test_soft_term_carries_the_t_squared_factor():
    logits, t_logits, y = torch.randn(8, 10), torch.randn(1, 10), torch.randint(0, 10, (8,))
    x = torch.zeros(8, 3)
    for temp in (1.0, 1.5, 2.0, 3.0):
        kl = F.kl_div(F.log_softmax(logits / temp, 1), F.softmax(t_logits.expand(8, -1) / temp, 1),
                      reduction="batchmean")
        got = kd_loss(FixedTeacher(t_logits), temperature=temp, alpha=1.0, lam=0.0)(logits, x, y)
        assert float(got) == pytest.approx(temp**2 * float(kl), rel=1e-5)


def test_teacher_runs_in_eval_mode_without_gradients():
    teacher = FixedTeacher(torch.randn(1, 10)).train()
    logits = torch.randn(4, 10, requires_grad=True)
    kd_loss(teacher)(logits, torch.zeros(4, 3), torch.randint(0, 10, (4,))).backward()
    assert teacher.calls == [(False, False)]
    assert teacher.logits.grad is None and logits.grad is not None


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": 0.0}, "--temperature must be positive"),
    ({"temperature": -1.0}, "--temperature must be positive"),
    ({"alpha": -0.1}, "--alpha must be >= 0"),
    ({"lam": -0.5}, "--lambda must be >= 0"),
    ({"alpha": 0.0, "lam": 0.0}, "both 0"),
])
def test_kd_loss_rejects_bad_parameters(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment.replace("-", r"\-")):
        kd_loss(FixedTeacher([[0.0, 1.0]]), **kwargs)


def test_teacher_with_other_classes_fails_clearly():
    loss = kd_loss(FixedTeacher(torch.zeros(1, 5)))
    with pytest.raises(UsageError, match="same classes"):
        loss(torch.randn(2, 10), torch.zeros(2, 3), torch.tensor([0, 1]))


# -- stochastic depth -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, blocks", [("light_resnet18", 8), ("resnet50", 16)])
def test_survival_probabilities_follow_the_linear_decay_rule(arch, blocks):
    model = build_model(arch, num_classes=10, in_channels=3)
    survival = apply_stochastic_depth(model, 0.5)
    assert list(survival) == [name for name, _, _ in residual_blocks(model)]
    assert len(survival) == blocks
    expected = [1 - i / blocks * (1 - 0.5) for i in range(1, blocks + 1)]
    assert list(survival.values()) == pytest.approx(expected)
    assert survival_probabilities(4, 0.2) == pytest.approx([0.8, 0.6, 0.4, 0.2])


def _branch_zero_recorder(model):
    """Per block, a list that gets True when the block's residual branch came out as all zeros."""
    seen = {}
    for name, _, end in residual_blocks(model):
        seen[name] = []
        end.register_forward_hook(lambda m, i, o, rec=seen[name]: rec.append(bool((o == 0).all())))
    return seen


def test_training_mode_drops_branches_at_the_rule_rate():
    model = build_model("light_resnet18", num_classes=10, in_channels=1)
    survival = apply_stochastic_depth(model, 0.5)
    seen = _branch_zero_recorder(model)  # registered after the drop hooks: sees their output
    model.train()
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        outs = [model(x) for _ in range(3)]
    assert not (torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]))  # BN alone is deterministic
    # Drop statistics per block, feeding each branch's last layer directly (cheap) so that many trials fit.
    trials, threads = 500, torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: one thread avoids synchronisation costs on a busy machine
    try:
        with torch.no_grad():
            for _, _, end in residual_blocks(model):
                z = torch.randn(2, end.num_features, 1, 1)
                for _ in range(trials):
                    end(z)
    finally:
        torch.set_num_threads(threads)
    for name, p in survival.items():
        drops = seen[name][3:]
        assert len(drops) == trials
        assert sum(drops) / trials == pytest.approx(1 - p, abs=0.07), (name, sum(drops) / trials, p)
    model.eval()
    with torch.no_grad():
        model(x)
        end(z)
    assert not any(rec[-1] for rec in seen.values())  # nothing is dropped in eval mode


def test_eval_mode_is_deterministic_and_equals_the_plain_network():
    plain = build_model("light_resnet18", num_classes=10, in_channels=1).eval()
    model = copy.deepcopy(plain)
    apply_stochastic_depth(model, 0.2, mode="row")
    model.train().eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.equal(model(x), plain(x))
    assert list(model.state_dict()) == list(plain.state_dict())


def test_stochastic_depth_model_exports_and_prunes(tmp_path):
    import torch_pruning as tp

    model = build_model("light_resnet18", num_classes=10, in_channels=1)
    apply_stochastic_depth(model, 0.5)
    model.eval()
    x = torch.randn(1, 1, 28, 28)
    torch.onnx.export(model, (x,), str(tmp_path / "sd.onnx"), dynamo=False, opset_version=17)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "sd.onnx")).graph.node}
    assert "RandomUniformLike" not in ops and "Bernoulli" not in ops
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.25, ignored_layers=[model.fc])
    pruner.step()
    model.train()
    model(torch.randn(2, 1, 28, 28)).sum().backward()  # still trains (and drops) after pruning
    remove_stochastic_depth(model)
    assert not any(m._forward_hooks for m in model.modules())


def test_stochastic_depth_needs_residual_blocks():
    with pytest.raises(UsageError, match="needs residual blocks"):
        apply_stochastic_depth(build_model("vgg16_bn_cifar", num_classes=10, in_channels=3), 0.5)
    with pytest.raises(UsageError, match=r"\(0, 1\]"):
        apply_stochastic_depth(build_model("light_resnet18", num_classes=10, in_channels=3), 0.0)


# -- freezing ---------------------------------------------------------------------------------------


def test_freeze_resolves_stem_and_rejects_unknown_prefixes():
    model = build_model("light_resnet18", num_classes=10, in_channels=1)
    assert freeze(model, "stem,layer1") == ["conv1", "bn1", "layer1"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1")}
    with pytest.raises(UsageError, match="top-level modules with parameters: conv1, bn1, layer1"):
        freeze(model, "layer9")
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


@needs_fmnist
def test_frozen_parameters_unchanged_after_an_epoch():
    from deploycomp import console
    from deploycomp.data import load_dataset
    from deploycomp.train import TrainConfig, fit

    model = build_model("light_resnet18", num_classes=10, in_channels=1)
    freeze(model, "stem,layer1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, _ = load_dataset("fashion-mnist", "train")
    console.set_verbosity(console.QUIET)
    try:
        fit(model, train, None, TrainConfig(train_samples=256, epochs=1, batch_size=128, optimizer="adam"))
    finally:
        console.set_verbosity(console.NORMAL)
    after = model.state_dict()
    for k, v in before.items():
        if k.split(".")[0] in ("conv1", "bn1", "layer1"):  # weights and BN running statistics
            assert torch.equal(v, after[k]), k
    assert not torch.equal(before["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])


def test_checkpoint_restores_freezing_and_plain_keys(tmp_path):
    from deploycomp.checkpoint import load_model

    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1)
    apply_stochastic_depth(ckpt.model, 0.5)
    assert freeze_checkpoint(ckpt, "stem,layer1") == ["conv1", "bn1", "layer1"]
    ckpt.model.eval()
    ckpt.save(tmp_path / "f.pt")
    loaded = load_model(str(tmp_path / "f.pt"))
    assert list(loaded.model.state_dict()) == list(build_model("light_resnet18", in_channels=1).state_dict())
    frozen = lambda m: [n for n, p in m.named_parameters() if not p.requires_grad]  # noqa: E731
    assert frozen(loaded.model) == frozen(ckpt.model) and frozen(ckpt.model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), ckpt.model(x))


# -- CLI --------------------------------------------------------------------------------------------


def _save_fresh(path, num_classes: int = 10, dataset: str = "synthetic"):
    from deploycomp.checkpoint import load_model

    ckpt = load_model("light_resnet18", num_classes=num_classes, in_channels=3)
    ckpt.metadata.update(dataset=dataset, input_shape=[3, 32, 32])
    ckpt.save(path)
    return path


@pytest.mark.parametrize("args, fragment", [
    (["-T", 0], "--temperature must be positive"),
    (["--temperature", -2], "--temperature must be positive"),
    (["--alpha", -0.5], "--alpha must be >= 0"),
    (["--lambda", -1], "--lambda must be >= 0"),
    (["--alpha", 0, "--lambda", 0], "both 0"),
])
def test_distill_cli_rejects_bad_loss_parameters(cli, args, fragment):
    result = cli("distill", "--teacher", "t.pt", "--student", "light_resnet18", *args, ok=False)
    assert_one_line_error(result, fragment)


def test_distill_cli_rejects_a_teacher_with_other_classes(cli, tmp_path):
    _save_fresh(tmp_path / "teacher.pt", 10)
    _save_fresh(tmp_path / "student.pt", 5)
    result = cli("distill", "--teacher", "teacher.pt", "--student", "student.pt", *FAST, ok=False)
    assert_one_line_error(result, "predicts 10 classes", "predicts 5")


def test_distill_cli_trains_records_lineage_and_reloads(cli, tmp_path):
    from deploycomp.checkpoint import load_model
    from deploycomp.data import load_dataset
    from deploycomp.train import evaluate

    _save_fresh(tmp_path / "teacher.pt")
    result = cli("distill", "--teacher", "teacher.pt", "--student", "light_resnet18", "-T", 2.5, "--alpha", 0.7,
                 "--lambda", 0.3, *FAST, "-o", "kd.pt", "--json")
    record = json.loads(result.stdout)
    assert record["command"] == "distill"
    ckpt = load_model(str(tmp_path / "kd.pt"))
    step = ckpt.metadata["lineage"][-1]
    assert step["op"] == "distill"
    p = step["params"]
    assert (p["teacher"], p["temperature"], p["alpha"], p["lambda"]) == ("teacher.pt", 2.5, 0.7, 0.3)
    assert (p["optimizer"], p["batch_size"], p["epochs"]) == ("adam", 32, 1)
    test, _ = load_dataset("synthetic", "test")
    again = evaluate(ckpt.model, test, device="cpu")
    assert again["loss"] == pytest.approx(record["test"]["loss"], rel=1e-5)  # same outputs after reload
    assert again["top1_pct"] == record["test"]["top1_pct"]


def test_train_cli_stochastic_depth_and_freeze(cli, tmp_path):
    result = cli("train", "--model", "light_resnet18", *FAST, "--stochastic-depth", 0.5, "--freeze", "stem,layer1",
                 "-o", "sd.pt")
    assert result.exit_code == 0
    report = json.loads(cli("info", "-m", "sd.pt", "--json").stdout)
    model = build_model("light_resnet18", num_classes=10, in_channels=3)
    expected = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1"))
    assert report["params_non_trainable"] == expected > 0
    assert report["surgeries"] == ["freeze"]
    params = report["lineage"][-1]["params"]
    assert params["stochastic_depth"] == 0.5 and params["freeze"] == ["stem", "layer1"]



def test_freeze_none_unfreezes_a_frozen_checkpoint(tmp_path):
    from deploycomp.checkpoint import load_model
    from deploycomp.distill import training_setup

    ckpt = load_model("light_resnet18", num_classes=10, in_channels=1)
    freeze_checkpoint(ckpt, "layer1")
    ckpt.save(tmp_path / "frozen.pt")
    loaded = load_model(str(tmp_path / "frozen.pt"))
    assert not all(p.requires_grad for p in loaded.model.parameters())
    prepare, lineage = training_setup(None, "none")
    prepare(loaded, None)
    assert all(p.requires_grad for p in loaded.model.parameters()) and loaded.surgeries == []


@pytest.mark.parametrize("args, fragments", [
    (["--model", "light_resnet18", "--freeze", "layer9"], ["'layer9' matches no parameter", "conv1, bn1, layer1"]),
    (["--model", "light_resnet18", "--stochastic-depth", 1.5], ["(0, 1]"]),
    (["--model", "vgg16_bn_cifar", "--stochastic-depth", 0.5], ["needs residual blocks"]),
])
def test_train_cli_rejects_bad_freeze_and_stochastic_depth(cli, args, fragments):
    assert_one_line_error(cli("train", *args, *FAST, ok=False), *fragments)


@needs_fmnist
def test_distill_cli_defaults_to_the_shipped_baseline(cli, tmp_path):
    """No --teacher: the shipped baseline teaches; a fresh student takes its classes and 1x28x28 input."""
    from deploycomp.checkpoint import default_model, load_model

    if not Path(default_model()).exists():
        pytest.skip(reason=f"the shipped baseline {default_model()} is missing")
    record = json.loads(cli("distill", "--student", "light_resnet18", "--epochs", 1, "--train-samples", 64,
                            "--val-samples", 64, "--batch-size", 32, "-o", "kd.pt", "--json").stdout)
    assert record["params"]["teacher"] == default_model()
    student = load_model(str(tmp_path / "kd.pt"))
    assert student.input_shape == (1, 28, 28) and student.num_classes == 10
