"""Dense-head detectors: anchor points, assignment, loss, distillation, and the shipped LightDet."""

from __future__ import annotations

import copy

import pytest
import torch

from deploycomp.errors import UsageError
from deploycomp.tasks.dense_det import anchor_points, assign, decode_ltrb, dense_detection_loss, distillation_loss


def _targets(*rows, m=3):
    t = torch.zeros(1, m, 5)
    t[..., 0] = -1
    for i, r in enumerate(rows):
        t[0, i] = torch.tensor(r, dtype=torch.float32)
    return t


def test_anchor_points_grid():
    p = anchor_points(64, 64, (8, 16))
    assert p.shape == (64 + 16, 3)
    assert p[0].tolist() == [4.0, 4.0, 8.0]
    assert p[1].tolist() == [12.0, 4.0, 8.0]  # row-major: x first
    assert p[8].tolist() == [4.0, 12.0, 8.0]
    assert p[64].tolist() == [8.0, 8.0, 16.0]
    assert anchor_points(65, 33, (8,)).shape == (9 * 5, 3)  # ceil(65/8) x ceil(33/8)


def test_decode_ltrb():
    points = torch.tensor([[12.0, 4.0, 8.0]])
    boxes = decode_ltrb(torch.tensor([[[1.0, 0.5, 2.0, 1.0]]]), points)
    assert boxes.tolist() == [[[4.0, 0.0, 28.0, 12.0]]]


def test_assign_center_sampling_exact():
    points = anchor_points(64, 64, (8, 16))
    positive, box, label = assign(points, _targets([2, 10, 10, 40, 40]))
    # stride 8: centers 12, 20, 28, 36 in both axes lie inside (10, 40) and within 20 px of 25: 16 points;
    # stride 16: only the center 24 lies inside: 1 point.
    assert int(positive[0, :64].sum()) == 16 and int(positive[0, 64:].sum()) == 1
    assert set(label[0][positive[0]].tolist()) == {2}
    assert box[0][positive[0]].unique(dim=0).tolist() == [[10.0, 10.0, 40.0, 40.0]]


def test_assign_small_box_gets_its_nearest_point_and_smaller_box_wins():
    points = anchor_points(64, 64, (8, 16))
    positive, _, label = assign(points, _targets([1, 0, 0, 3, 3]))
    assert positive[0].nonzero().flatten().tolist() == [0]  # no center inside: the nearest point (4, 4)
    assert label[0, 0] == 1
    big, small = [0, 0, 0, 64, 64], [5, 16, 16, 32, 32]
    positive, box, label = assign(points, _targets(big, small))
    inside_small = (points[:, 0] > 16) & (points[:, 0] < 32) & (points[:, 1] > 16) & (points[:, 1] < 32)
    assert (label[0][inside_small] == 5).all()
    assert (label[0][positive[0] & ~inside_small] == 0).all()


def test_padding_only_targets_train_the_background():
    points = anchor_points(32, 32, (8,))
    raw = torch.zeros(2, len(points), 4 + 3, requires_grad=True)
    loss = dense_detection_loss(raw, points, torch.full((2, 2, 5), -1.0), 3)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert raw.grad[..., 4:].abs().sum() > 0 and raw.grad[..., :4].abs().sum() == 0


def test_light_det_learns_a_batch():
    from deploycomp.tasks.nets import LightDet

    torch.manual_seed(0)
    model = LightDet(3, 1)
    x = torch.randn(4, 1, 64, 64)
    t = torch.full((4, 2, 5), -1.0)
    t[:, 0] = torch.tensor([1.0, 8, 8, 40, 36])
    t[1, 1] = torch.tensor([2.0, 30, 30, 60, 62])
    assert model(x).shape == (4, 80, 7)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(40):
        loss = model.detection_loss(x, t)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_distillation_loss_needs_matching_teachers():
    from deploycomp.tasks.nets import LightDet

    torch.manual_seed(0)
    student = LightDet(3, 1).eval()
    teacher = copy.deepcopy(student)
    x = torch.randn(2, 1, 64, 64)
    t = torch.full((2, 1, 5), -1.0)
    loss = distillation_loss(teacher, 2.0, 1.0, 0.0)(student)
    out = student(x)
    same = loss(out, x, t)
    assert torch.isfinite(same)
    with torch.no_grad():
        student.cls_pred.bias += 2.0
    assert loss(student(x), x, t) > same  # moving away from the teacher costs
    other = LightDet(4, 1)
    with pytest.raises(UsageError, match="same points"):
        distillation_loss(other, 2.0, 1.0, 0.0)(student)(out, x, t)
