"""The task layer: what classification and segmentation own, and every command path through it on tiny models."""

from __future__ import annotations

import pytest
import torch

from deploycomp.errors import UsageError
from deploycomp.tasks import check_same_task, get_task, list_tasks, task_for_data
from deploycomp.zoo import build_model


class _Masks:
    """A tiny segmentation set: the class of a pixel is which quarter of the image is bright."""

    def __init__(self, n: int, size: int = 16, classes: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, size, size, generator=g) * 0.2
        self.y = torch.zeros(n, size, size, dtype=torch.long)
        for i in range(n):
            c = int(torch.randint(1, classes, (), generator=g))
            h = size // 2
            self.x[i, 0, :h, :h] += c / classes  # brightness says the class
            self.y[i, :h, :h] = c

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_registry_names_the_tasks():
    assert sorted(list_tasks()) == ["classification", "detection", "segmentation"]
    with pytest.raises(Exception, match="segmentation"):
        get_task("keypoints", 3)


def test_classification_meter_is_top1_and_top5():
    task = get_task("classification", 3)
    meter = task.meter()
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [1.0, 3.0, 2.0], [2.0, 1.0, 0.0]])
    meter.update(logits, torch.tensor([0, 0, 2, 2]))
    r = meter.result()
    assert r["top1_pct"] == 25.0 and r["samples"] == 4
    assert r["top5_pct"] == 100.0  # three classes: every label is in the top 5


def test_segmentation_meter_scores_pixels_and_skips_the_ignore_index():
    task = get_task("segmentation", 2, ignore_index=255)
    meter = task.meter()
    target = torch.tensor([[[0, 0], [1, 255]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # predicts [[0, 1], [1, 1]]
    meter.update(logits, target)
    r = meter.result()
    # class 0: TP 1, FP 0, FN 1 -> IoU 1/2; class 1: TP 1, FP 1 -> IoU 1/2; the 255 pixel is not scored
    assert r["miou_pct"] == pytest.approx(50.0) and r["pixel_acc_pct"] == pytest.approx(200 / 3)
    hits, counted = task.train_accuracy(logits, target)
    assert (hits, counted) == (2, 3)


def test_a_model_of_one_task_meets_data_of_another_in_one_line():
    with pytest.raises(UsageError, match="segmentation model but dataset fashion-mnist is for classification"):
        check_same_task("segmentation", "classification", "unet.pt", "fashion-mnist")
    check_same_task(None, "segmentation", "user.py:net", "fashion-scenes")  # user code follows the data


def test_outputs_that_do_not_fit_the_task_are_one_line_errors():
    seg, cls = get_task("segmentation", 3), get_task("classification", 3)
    with pytest.raises(UsageError, match="is it a classifier"):
        seg.check_outputs(torch.zeros(2, 3), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(UsageError, match="must upsample"):
        seg.check_outputs(torch.zeros(2, 3, 4, 4), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(UsageError, match="is it a segmentation model"):
        cls.check_outputs(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("name, heads", [("light_unet", ["head"]),
                                         ("lraspp_mobilenet_v3_large",
                                          ["model.classifier.low_classifier", "model.classifier.high_classifier"]),
                                         ("deeplabv3_mobilenet_v3_large", ["model.classifier.4"])])
def test_pruning_protects_every_layer_that_produces_the_classes(name, heads):
    from deploycomp.prune.channels import ignored_layers

    model = build_model(name, num_classes=5, in_channels=1)
    assert ignored_layers(model, [], get_task("segmentation", 5)) == heads


def test_fit_and_evaluate_train_a_segmenter():
    from deploycomp.train import TrainConfig, evaluate, fit

    torch.manual_seed(0)
    model = build_model("light_unet", num_classes=3, in_channels=1)
    data, task = _Masks(64), get_task("segmentation", 3)
    before = evaluate(model, data, batch_size=16, device="cpu", task=task)
    result = fit(model, data, data, TrainConfig(epochs=3, batch_size=16, lr=3e-3, optimizer="adam", device="cpu"),
                 task=task)
    after = result.final
    assert set(before) >= {"miou_pct", "pixel_acc_pct", "loss", "samples"} and before["samples"] == 64
    assert after["loss"] < before["loss"] and after["miou_pct"] > before["miou_pct"]
    assert "train_pixel_acc_pct" in result.history[-1] and 0 <= result.history[-1]["train_pixel_acc_pct"] <= 100


def test_prune_channels_keeps_a_segmenters_classes_and_resolution():
    from deploycomp.metrics import count_macs
    from deploycomp.prune.channels import ignored_layers, prune_channels
    from deploycomp.prune.criteria import get_criterion

    model = build_model("lraspp_mobilenet_v3_large", num_classes=5, in_channels=1).eval()
    x = torch.randn(1, 1, 64, 64)
    before = count_macs(model, x)
    ignore = ignored_layers(model, [], get_task("segmentation", 5))
    prune_channels(model, x, get_criterion("magnitude")(), 0.3, ignore=ignore)
    with torch.no_grad():
        assert model(x).shape == (1, 5, 64, 64)
    assert count_macs(model, x) < 0.75 * before


def test_pixelwise_kd_is_the_mean_kl_per_pixel():
    import torch.nn.functional as F

    from deploycomp.distill import kd_loss

    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(1, 3, 1)
    x = torch.randn(2, 1, 4, 4)
    student = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        t = teacher(x)
    loss = kd_loss(teacher, temperature=2.0, alpha=1.0, lam=0.0)(student, x, torch.zeros(2, 4, 4, dtype=torch.long))
    per_pixel = [F.kl_div(F.log_softmax(student[n, :, i, j] / 2, 0), F.log_softmax(t[n, :, i, j] / 2, 0),
                          reduction="sum", log_target=True) for n in range(2) for i in range(4) for j in range(4)]
    assert float(loss) == pytest.approx(4.0 * float(torch.stack(per_pixel).mean()), rel=1e-5)


def test_parity_counts_pixel_agreement():
    from deploycomp.export import compare

    ref = torch.zeros(1, 2, 2, 2)
    ref[0, 1, 0, 0] = 1.0  # argmax: [[1, 0], [0, 0]]
    out = torch.zeros(1, 2, 2, 2)
    r = compare(ref.numpy(), out.numpy())
    assert r["agreement"] == "pixel" and r["top1_agreement_pct"] == 75.0 and r["samples"] == 1


def test_task_of_data_info():
    from deploycomp.data import DatasetInfo

    info = DatasetInfo("x", 4, (1, 8, 8), (0.5,), (0.25,), task="segmentation", ignore_index=255)
    task = task_for_data(info)
    assert task.name == "segmentation" and task.num_classes == 4 and task.ignore_index == 255
    assert task_for_data(DatasetInfo("y", 10, (1, 28, 28), (0.5,), (0.25,))).metric == "top1_pct"


def test_relevance_starts_from_every_pixels_true_class():
    from deploycomp.prune.calibrate import _one_hot

    y = torch.tensor([[[0, 2], [255, 1]]])
    hot = _one_hot(y, torch.zeros(1, 3, 2, 2))
    assert hot.shape == (1, 3, 2, 2) and hot[0, :, 1, 0].tolist() == [0, 0, 0]  # ignored pixel: no relevance
    assert hot[0, 2, 0, 1] == 1 and hot.sum() == 3
    assert _one_hot(torch.tensor([1, 0]), torch.zeros(2, 3)).tolist() == [[0, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize("method", ["taylor", "wanda", "coverage", "lrp", "slimming"])
def test_every_data_driven_criterion_prunes_a_segmenter(method):
    from deploycomp.data import DatasetInfo
    from deploycomp.inputs import Data
    from deploycomp.prune import PruneConfig, prune_checkpoint

    torch.manual_seed(0)
    ckpt = __import__("deploycomp.checkpoint", fromlist=["load_model"]).load_model(
        "light_unet", num_classes=3, in_channels=1, input_size=(16, 16))
    info = DatasetInfo("masks", 3, (1, 16, 16), (0.5,), (0.25,), task="segmentation")
    data = Data(info, _Masks(16), _Masks(32, seed=1))
    pruned, record = prune_checkpoint(ckpt, data, PruneConfig(method=method, ratio=0.25, calib_samples=8,
                                                               calib_batch=4, finetune=None))
    with torch.no_grad():
        assert pruned.model(torch.zeros(2, 1, 16, 16)).shape == (2, 3, 16, 16)
    assert record["task"] == "segmentation" and record["macs_reduction_pct"] > 20
    assert 0 <= record["accuracy"]["after_pruning"]["miou_pct"] <= 100
