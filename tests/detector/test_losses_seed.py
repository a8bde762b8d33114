"""The box losses against a transcription of the DIoU code's (DIoU-pytorch-detectron,
``lib/utils/net.py``) formulas: DIoU in the proposal frame, CIoU with ``v_grad=reference``, and
the delta losses (L1, Smooth-L1's β).

Shapes: R sampled RoIs, K classes incl. background, P positives; deltas Tensor[R, K*4].
"""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from ioulab.detector import config as C
from ioulab.detector.losses import ciou_loss, diou_loss
from ioulab.detector.model.build import build_box_loss
from ioulab.detector.model.roi_heads import BoxRegressionLoss

WEIGHTS = (10.0, 10.0, 5.0, 5.0)
CODER = det_utils.BoxCoder(WEIGHTS)


# --- the seed code's formulas, transcribed (per pair; boxes as (x1, y1, x2, y2) column tuples) ---
def seed_decode(deltas):
    """``bbox_transform``: deltas Tensor[P, 4] against a unit box centred at 0."""
    wx, wy, ww, wh = WEIGHTS
    cx, cy = deltas[:, 0] / wx, deltas[:, 1] / wy
    w = torch.exp((deltas[:, 2] / ww).clamp(max=math.log(1000 / 16)))
    h = torch.exp((deltas[:, 3] / wh).clamp(max=math.log(1000 / 16)))
    return cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h


def seed_terms(p, g):
    """IoU, d²/c², and the sides of both boxes, as in ``compute_diou`` / ``compute_ciou``."""
    x1, y1, x2, y2 = p
    x1g, y1g, x2g, y2g = g
    x2, y2 = torch.max(x1, x2), torch.max(y1, y2)
    iw, ih = torch.min(x2, x2g) - torch.max(x1, x1g), torch.min(y2, y2g) - torch.max(y1, y1g)
    inter = torch.where((iw > 0) & (ih > 0), iw * ih, torch.zeros_like(iw))
    iou = inter / ((x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter + 1e-7)
    c = (torch.max(x2, x2g) - torch.min(x1, x1g)) ** 2 + (torch.max(y2, y2g) - torch.min(y1, y1g)) ** 2 + 1e-7
    d = ((x1 + x2) / 2 - (x1g + x2g) / 2) ** 2 + ((y1 + y2) / 2 - (y1g + y2g) / 2) ** 2
    return iou, d / c, x2 - x1, y2 - y1, x2g - x1g, y2g - y1g


def seed_diou(p, g):
    iou, u, *_ = seed_terms(p, g)
    return 1 - (iou - u)


def seed_ciou(p, g):
    iou, u, w, h, wg, hg = seed_terms(p, g)
    with torch.no_grad():
        gap = torch.atan(wg / hg) - torch.atan(w / h)
        v = 4 / math.pi**2 * gap**2
        alpha = v / (1 - iou + v)
        twice_w = 2 * w
    surrogate = 8 / math.pi**2 * gap * (w - twice_w) * h
    return 1 - (iou - (u + alpha * surrogate))


def columns(boxes):
    return tuple(boxes[:, i] for i in range(4))


# --------------------------------------------------------------------------------------------
def _positives(R=12, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    deltas = (torch.randn(R, 4 * K, generator=g, dtype=torch.float64) * 0.8).requires_grad_()
    targets = torch.randn(R, 4, generator=g, dtype=torch.float64) * 0.8
    labels = torch.randint(0, K, (R,), generator=g)
    labels[:3] = torch.tensor([1, 2, 3])  # at least three positives
    proposals = torch.rand(R, 2, generator=g, dtype=torch.float64) * 50
    proposals = torch.cat([proposals, proposals + 5 + torch.rand(R, 2, generator=g, dtype=torch.float64) * 80], 1)
    return deltas, labels, targets, proposals


def test_proposal_frame_diou_value_and_gradient_equal_the_seed_code():
    deltas, labels, targets, proposals = _positives()
    ours, _ = BoxRegressionLoss(CODER, diou_loss, proposal_frame=True)(deltas, labels, targets, proposals)
    (grad_ours,) = torch.autograd.grad(ours, deltas)

    pos = torch.where(labels > 0)[0]
    pred = deltas.reshape(len(labels), -1, 4)[pos, labels[pos]]
    # The seed sums over positives and divides by all sampled RoIs (output.size(0)).
    seed = seed_diou(seed_decode(pred), seed_decode(targets[pos])).sum() / len(labels)
    (grad_seed,) = torch.autograd.grad(seed, deltas)

    assert ours.item() == pytest.approx(seed.item(), abs=1e-12)
    assert grad_seed.abs().max() > 1e-3  # a real gradient, not two zero tensors
    torch.testing.assert_close(grad_ours, grad_seed, rtol=0, atol=1e-12)


def test_image_frame_diou_differs_from_the_seed_code():
    """The reason for frame=proposal: in the image frame d²/c² mixes the proposal's scales."""
    deltas, labels, targets, proposals = _positives()
    image, _ = BoxRegressionLoss(CODER, diou_loss)(deltas, labels, targets, proposals)
    proposal, _ = BoxRegressionLoss(CODER, diou_loss, proposal_frame=True)(deltas, labels, targets, proposals)
    assert abs(image.item() - proposal.item()) > 1e-4


# A wide prediction against a tall target: the two v gradients point opposite ways.
PRED, TARGET = [[0.0, 0.0, 4.0, 2.0]], [[1.0, 0.0, 3.0, 4.0]]


def _grad(loss_fn, **kw):
    pred = torch.tensor(PRED, dtype=torch.float64, requires_grad=True)
    loss_fn(pred, torch.tensor(TARGET, dtype=torch.float64), **kw).sum().backward()
    return pred.grad[0]


def test_ciou_reference_has_the_seed_codes_gradient_and_the_exact_value():
    pred = torch.tensor(PRED, dtype=torch.float64, requires_grad=True)
    seed = seed_ciou(columns(pred), columns(torch.tensor(TARGET, dtype=torch.float64)))
    seed.sum().backward()
    reference, exact = _grad(ciou_loss, v_grad="reference"), _grad(ciou_loss, v_grad="exact")
    # eps: ours guards atan(w/h) and α's denominator with 1e-7, the seed does not.
    torch.testing.assert_close(reference, pred.grad[0], rtol=1e-6, atol=1e-9)
    # x1 (and x2): the seed's surrogate widens a box that is already too wide; exact narrows it.
    assert reference[0] > 0 > exact[0] and reference[2] < 0 < exact[2]
    # The value stays 1 - CIoU under both settings (REFERENCE.md's formula).
    p, t = torch.tensor(PRED, dtype=torch.float64), torch.tensor(TARGET, dtype=torch.float64)
    assert ciou_loss(p, t, v_grad="reference").item() == pytest.approx(ciou_loss(p, t).item(), abs=1e-15)


def test_ciou_reference_only_changes_the_v_term():
    """Where v = 0 (same aspect ratio), reference and exact CIoU have DIoU's gradient."""
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[1.0, 1.0, 4.0, 4.0]], dtype=torch.float64)
    grads = []
    for fn, kw in ((diou_loss, {}), (ciou_loss, {"v_grad": "reference"}), (ciou_loss, {})):
        (g,) = torch.autograd.grad(fn(pred, target, **kw).sum(), pred)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=0, atol=1e-12)


def test_ciou_v_grad_rejects_unknown_names():
    with pytest.raises(ValueError, match="v_grad"):
        ciou_loss(torch.tensor(PRED), torch.tensor(TARGET), v_grad="approx")


# --- the box head built from the config ------------------------------------------------------
def _head_loss(*overrides):
    cfg = C.load_config("cpu_tiny", list(overrides))
    deltas, labels, targets, proposals = _positives()
    return build_box_loss(cfg.model.roi_heads.box_loss, CODER)(deltas, labels, targets, proposals)[0]


def test_l1_is_the_sum_of_absolute_delta_errors_over_sampled_rois():
    deltas, labels, targets, _ = _positives()
    pos = torch.where(labels > 0)[0]
    expected = (deltas.reshape(len(labels), -1, 4)[pos, labels[pos]] - targets[pos]).abs().sum() / len(labels)
    assert _head_loss("model.roi_heads.box_loss.type=l1").item() == pytest.approx(expected.item(), rel=1e-12)


def test_smooth_l1_beta_changes_the_loss_as_written():
    deltas, labels, targets, _ = _positives()
    pos = torch.where(labels > 0)[0]
    x = (deltas.reshape(len(labels), -1, 4)[pos, labels[pos]] - targets[pos]).abs()
    for beta in (1.0 / 9.0, 1.0):
        expected = torch.where(x < beta, 0.5 * x**2 / beta, x - 0.5 * beta).sum() / len(labels)
        got = _head_loss(f"model.roi_heads.box_loss.smooth_l1_beta={beta}")
        assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    assert _head_loss("model.roi_heads.box_loss.smooth_l1_beta=1.0").item() != \
        pytest.approx(_head_loss().item(), rel=1e-3)
    # β = 0 is L1.
    assert _head_loss("model.roi_heads.box_loss.smooth_l1_beta=0").item() == \
        pytest.approx(_head_loss("model.roi_heads.box_loss.type=l1").item(), rel=1e-12)


def test_ciou_v_grad_reaches_the_head_loss():
    deltas, labels, targets, proposals = _positives()
    grads = {}
    for mode in ("exact", "reference"):
        cfg = C.load_config("cpu_tiny", ["model.roi_heads.box_loss.type=ciou",
                                         f"model.roi_heads.box_loss.ciou_v_grad={mode}"])
        loss = build_box_loss(cfg.model.roi_heads.box_loss, CODER)(deltas, labels, targets, proposals)[0]
        (grads[mode],) = torch.autograd.grad(loss, deltas)
    assert not torch.allclose(grads["exact"], grads["reference"])
