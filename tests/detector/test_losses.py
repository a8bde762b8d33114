"""IoU-family losses: REFERENCE.md's table, a plain-float reference, gradients, degenerate boxes."""
from __future__ import annotations

import math
import random

import pytest
import torch

from ioulab.detector.losses import (BOX_LOSSES, ciou_loss, diou_loss, giou_loss, iou_loss,
                                    paired_iou)

EPS = 1e-7

# REFERENCE.md, "IoU-family losses": pred, target, IoU, GIoU, DIoU, CIoU (H is a head-level test).
TABLE = {
    "A": ([0, 0, 10, 10], [0, 0, 10, 10], 1.0, 1.0, 1.0, 1.0),
    "B": ([0, 0, 2, 2], [1, 1, 3, 3], 0.142857, -0.079365, 0.031746, 0.031746),
    "C": ([0, 0, 1, 1], [2, 2, 3, 3], 0.0, -0.777778, -0.444444, -0.444444),
    "D": ([1, 0, 3, 4], [0, 1, 4, 3], 0.333333, 0.083333, 0.333333, 0.299582),
    "E": ([0, 0, 10, 10], [0, 0, 10, 8], 0.8, 0.8, 0.795, 0.794880),
    "F": ([0, 0, 4, 4], [0, 0, 2, 2], 0.25, 0.25, 0.1875, 0.1875),
    "I": ([0, 0, 6, 2], [0, 0, 2, 6], 0.2, -0.244444, 0.088889, -0.016857),
}
NAMES = ["iou", "giou", "diou", "ciou"]


@pytest.mark.parametrize("case", sorted(TABLE))
@pytest.mark.parametrize("name", NAMES)
def test_reference_table(case, name):
    pred, target, *values = TABLE[case]
    loss = BOX_LOSSES[name](torch.tensor([pred], dtype=torch.float32),
                            torch.tensor([target], dtype=torch.float32))
    assert loss.shape == (1,)
    # The table gives 6 decimals, so 1e-5 holds only up to its rounding (5e-7).
    assert 1.0 - loss.item() == pytest.approx(values[NAMES.index(name)], abs=1e-5)


def test_paired_iou_matches_table_and_is_elementwise():
    preds = torch.tensor([TABLE[c][0] for c in sorted(TABLE)], dtype=torch.float32)
    targets = torch.tensor([TABLE[c][1] for c in sorted(TABLE)], dtype=torch.float32)
    expected = torch.tensor([TABLE[c][2] for c in sorted(TABLE)])
    torch.testing.assert_close(paired_iou(preds, targets), expected, atol=1e-5, rtol=0)


# ---- a straightforward per-box reference in plain floats -----------------------------------
def _reference(p, t, name):
    """1 - {IoU, GIoU, DIoU, CIoU} of two xyxy lists, with the same eps placement as the spec."""
    iw = max(0.0, min(p[2], t[2]) - max(p[0], t[0]))
    ih = max(0.0, min(p[3], t[3]) - max(p[1], t[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
    iou = inter / (union + EPS)
    if name == "iou":
        return 1 - iou
    cw = max(p[2], t[2]) - min(p[0], t[0])
    ch = max(p[3], t[3]) - min(p[1], t[1])
    if name == "giou":
        return 1 - (iou - (cw * ch - union) / (cw * ch + EPS))
    d2 = ((p[0] + p[2]) / 2 - (t[0] + t[2]) / 2) ** 2 + ((p[1] + p[3]) / 2 - (t[1] + t[3]) / 2) ** 2
    diou = iou - d2 / (cw**2 + ch**2 + EPS)
    if name == "diou":
        return 1 - diou
    v = 4 / math.pi**2 * (math.atan((t[2] - t[0]) / (t[3] - t[1]))
                          - math.atan((p[2] - p[0]) / (p[3] - p[1]))) ** 2
    alpha = v / ((1 - iou) + v + EPS)
    return 1 - (diou - alpha * v)


def _random_boxes(rng, n, spread=20.0):
    boxes = []
    for _ in range(n):
        x, y = rng.uniform(0, spread), rng.uniform(0, spread)
        boxes.append([x, y, x + rng.uniform(0.5, 15), y + rng.uniform(0.5, 15)])
    return boxes


@pytest.mark.parametrize("name", NAMES)
def test_matches_plain_float_reference_on_random_boxes(name):
    rng = random.Random(0)
    preds, targets = _random_boxes(rng, 200), _random_boxes(rng, 200)
    expected = torch.tensor([_reference(p, t, name) for p, t in zip(preds, targets)],
                            dtype=torch.float64)
    got = BOX_LOSSES[name](torch.tensor(preds, dtype=torch.float64),
                           torch.tensor(targets, dtype=torch.float64))
    assert got.dtype == torch.float64
    # CIoU's angle is atan2(w, h + eps): it differs from atan(w/h) by ~eps/h.
    tol = 1e-7 if name == "ciou" else 1e-9
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    # Both regimes are covered: overlapping pairs and disjoint ones.
    assert (got < 1).any()
    assert (got == 1).any() if name == "iou" else (got > 1).any()


@pytest.mark.parametrize("name", NAMES)
def test_reductions(name):
    rng = random.Random(1)
    pred = torch.tensor(_random_boxes(rng, 7))
    target = torch.tensor(_random_boxes(rng, 7))
    fn = BOX_LOSSES[name]
    per_box = fn(pred, target)
    torch.testing.assert_close(fn(pred, target, reduction="sum"), per_box.sum())
    torch.testing.assert_close(fn(pred, target, reduction="mean"), per_box.mean())
    empty = torch.zeros(0, 4, requires_grad=True)
    assert fn(empty, empty).shape == (0,)
    mean_of_nothing = fn(empty, empty.detach(), reduction="mean")
    assert mean_of_nothing.item() == 0.0  # no positives: 0, not NaN
    mean_of_nothing.backward()
    with pytest.raises(ValueError, match="reduction"):
        fn(pred, target, reduction="avg")


def test_ciou_alpha_carries_no_gradient():
    """Gradient equals that of the same formula with α detached (and differs with α attached)."""
    rng = random.Random(2)
    pred = torch.tensor(_random_boxes(rng, 16, spread=5.0), dtype=torch.float64,
                        requires_grad=True)
    target = torch.tensor(_random_boxes(rng, 16, spread=5.0), dtype=torch.float64)

    def manual(detach_alpha):
        iou = paired_iou(pred, target)
        diou_part = diou_loss(pred, target)
        wp, hp = pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1]
        wt, ht = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
        v = 4 / math.pi**2 * (torch.atan(wt / ht) - torch.atan(wp / hp)) ** 2
        alpha = v / ((1 - iou) + v + EPS)
        return diou_part + (alpha.detach() if detach_alpha else alpha) * v

    (grad,) = torch.autograd.grad(ciou_loss(pred, target).sum(), pred)
    (grad_detached,) = torch.autograd.grad(manual(True).sum(), pred)
    (grad_attached,) = torch.autograd.grad(manual(False).sum(), pred)
    torch.testing.assert_close(grad, grad_detached)
    assert not torch.allclose(grad, grad_attached)


# Not CIoU: its α is held constant by design, so finite differences (which see α move) disagree;
# test_ciou_alpha_carries_no_gradient checks its gradient instead.
@pytest.mark.parametrize("name", ["iou", "giou", "diou"])
def test_gradcheck_float64(name):
    pred = torch.tensor([[1.0, 2.0, 7.0, 5.0], [0.3, 0.1, 2.2, 4.0], [10.0, 10.0, 12.0, 13.0]],
                        dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[2.0, 1.5, 8.0, 6.5], [0.0, 0.0, 3.0, 3.0], [0.0, 1.0, 4.0, 2.0]],
                          dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: BOX_LOSSES[name](p, target), (pred,))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_descent_moves_box_onto_target(name):
    target = torch.tensor([[30.0, 40.0, 70.0, 60.0]])
    # IoU loss has no gradient without overlap; the others must also pull a disjoint box in.
    start = [[35.0, 42.0, 55.0, 70.0]] if name == "iou" else [[0.0, 0.0, 10.0, 25.0]]
    box = torch.tensor(start, requires_grad=True)
    optimizer = torch.optim.Adam([box], lr=1.0)
    before = paired_iou(box.detach(), target).item()
    for _ in range(300):
        optimizer.zero_grad()
        BOX_LOSSES[name](box, target).sum().backward()
        optimizer.step()
    after = paired_iou(box.detach(), target).item()
    assert after > 0.9 and after > before


# identical, zero-size (both and one), touching, disjoint, zero-height strip
DEGENERATE_PRED = [[0, 0, 10, 10], [3, 3, 3, 3], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1],
                   [5, 5, 5, 9]]
DEGENERATE_TARGET = [[0, 0, 10, 10], [3, 3, 3, 3], [1, 1, 2, 2], [1, 0, 2, 1], [4, 4, 6, 9],
                     [5, 5, 9, 5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_boxes_finite_under_autocast(name, dtype):
    pred = torch.tensor(DEGENERATE_PRED, dtype=dtype, requires_grad=True)
    target = torch.tensor(DEGENERATE_TARGET, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BOX_LOSSES[name](pred, target)
        (grad,) = torch.autograd.grad(loss.sum(), pred)
    assert loss.dtype == torch.float32  # computed in float32 whatever the input
    assert torch.isfinite(loss).all(), loss
    assert torch.isfinite(grad.float()).all(), grad
    # Identical boxes: loss 0 (up to eps), the spec's "ours must not be NaN" case for CIoU.
    assert loss[0].item() == pytest.approx(0.0, abs=1e-6)


def test_ciou_identical_boxes_not_nan_where_reference_formula_is():
    box = torch.tensor([[2.0, 3.0, 8.0, 5.0]], requires_grad=True)
    loss = ciou_loss(box, box.detach())
    loss.sum().backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(box.grad).all()
    # The DIoU repo's α = v / ((1 - IoU) + v) is 0/0 here.
    v, one_minus_iou = torch.tensor(0.0), torch.tensor(0.0)
    assert torch.isnan(v / (one_minus_iou + v))


def test_public_functions_are_the_table_entries():
    assert BOX_LOSSES == {"iou": iou_loss, "giou": giou_loss, "diou": diou_loss,
                          "ciou": ciou_loss}
