"""IoU-family box regression losses: pure functions on matched xyxy pairs.

Shapes: N matched pairs; ``pred``, ``target``: Tensor[N, 4] as (x1, y1, x2, y2).
Every loss returns ``1 - value`` per pair (Tensor[N] for ``reduction="none"``, a scalar for
``"mean"`` / ``"sum"``) and is computed in float32 at least: float16 / bfloat16 inputs (e.g.
boxes decoded under ``torch.autocast``) are cast up first, because ratios of near-equal areas
lose their meaning in 8 mantissa bits. float64 inputs stay float64 (gradcheck).

Equations, eps = 1e-7 in each denominator. [GIoU]: Rezatofighi et al., "Generalized Intersection
over Union", CVPR 2019, arXiv:1902.09630. [DIoU]: Zheng et al., "Distance-IoU Loss", AAAI 2020,
arXiv:1911.08287.

    IoU  = |B ∩ Bg| / |B ∪ Bg|
    GIoU = IoU - |C \\ (B ∪ Bg)| / |C|      C: smallest box enclosing B and Bg       [GIoU]
    DIoU = IoU - d² / c²                   d: centre distance, c: diagonal of C     [DIoU]
    CIoU = DIoU - α·v,  v = 4/π² (atan(wg/hg) - atan(w/h))²                          [DIoU]
           α = v / ((1 - IoU) + v), a constant for the gradient (as in [DIoU])

``ciou_loss(..., v_grad="reference")`` keeps CIoU's value but takes v's gradient from the DIoU
code's ``compute_ciou`` (a no-grad surrogate, see :func:`_seed_aspect_surrogate`).

Delta losses (``DELTA_LOSSES``) compare encoded deltas instead, Tensor[P, 4] each: Fast R-CNN's
Smooth-L1 (β = 1/9 in torchvision, 1.0 in the DIoU code) and the L1 of the IoUNet reproduction's
baseline (mmdetection's ``L1Loss``); both sum over the 4 coordinates.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import distance_box_iou_loss, generalized_box_iou_loss

__all__ = ["BOX_LOSSES", "CIOU_V_GRADS", "DELTA_LOSSES", "at_least_float32", "ciou_loss", "diou_loss",
           "giou_loss", "iou_loss", "l1_delta_loss", "paired_iou", "smooth_l1_delta_loss"]

CIOU_V_GRADS = ("exact", "reference")


def at_least_float32(x: Tensor) -> Tensor:
    """float16 / bfloat16 (autocast outputs) → float32; float32 / float64 unchanged (torchvision's
    losses' rule). The losses, the NMS variants and the box head compute in at least float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        # An empty batch (no positives) must give 0 with a graph, not NaN.
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def _inter_union(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of matched pairs: Tensor[N] each."""
    wh = (torch.minimum(pred[..., 2:], target[..., 2:])
          - torch.maximum(pred[..., :2], target[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_p = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_t = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    return inter, area_p + area_t - inter


def paired_iou(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """Elementwise IoU = |B ∩ Bg| / |B ∪ Bg| of matched pairs: Tensor[N, 4] x2 -> Tensor[N].

    torchvision only has the pairwise N x M ``box_iou``; its diagonal would cost N².
    Zero-area pairs give 0 (eps in the denominator), not NaN.
    """
    pred, target = at_least_float32(pred), at_least_float32(target)
    inter, union = _inter_union(pred, target)
    return inter / (union + eps)


def iou_loss(pred: Tensor, target: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """1 - IoU, IoU = |B ∩ Bg| / |B ∪ Bg|. pred, target: Tensor[N, 4] -> Tensor[N] (or scalar).

    Zero gradient once the boxes stop overlapping; GIoU/DIoU/CIoU fix that.
    """
    return _reduce(1.0 - paired_iou(pred, target, eps), reduction)


def giou_loss(pred: Tensor, target: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """1 - GIoU, GIoU = IoU - |C \\ (B ∪ Bg)| / |C|, C the smallest enclosing box [GIoU].

    pred, target: Tensor[N, 4] xyxy -> Tensor[N]. torchvision's ``generalized_box_iou_loss``
    computes exactly this (eps in both denominators, half -> float32 upcast), so it is used as is.
    """
    return generalized_box_iou_loss(at_least_float32(pred), at_least_float32(target), reduction=reduction, eps=eps)


def diou_loss(pred: Tensor, target: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    """1 - DIoU, DIoU = IoU - d²/c², d the centre distance, c the enclosing diagonal [DIoU].

    pred, target: Tensor[N, 4] xyxy -> Tensor[N]. torchvision's ``distance_box_iou_loss`` is the
    same formula with eps added to IoU's and c²'s denominators, so it is used as is.
    """
    return distance_box_iou_loss(at_least_float32(pred), at_least_float32(target), reduction=reduction, eps=eps)


def _aspect_angle(boxes: Tensor, eps: float) -> Tensor:
    """atan(w / h) in [0, π/2] for Tensor[N, 4] -> Tensor[N], finite value and gradient always.

    atan2(w, h) equals atan(w/h) for h > 0 and, unlike w/h, stays finite at h = 0; eps keeps it
    away from its one singular point (0, 0), where the gradient is NaN. Sides are clamped at 0:
    an inverted box has no meaningful angle, and clamp's zero gradient at exactly 0 spares a
    zero-size box the ~1/eps push the angle would otherwise give it (IoU and distance terms still
    move it).
    """
    w = (boxes[..., 2] - boxes[..., 0]).clamp(min=0)
    h = (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return torch.atan2(w, h + eps)


def _seed_aspect_surrogate(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """The DIoU code's stand-in for v in ``compute_ciou``: Tensor[N, 4] x2 -> Tensor[N].

    With A = atan(wg/hg) - atan(w/h) and a copy of 2w both held constant, it is
    ar = 8/π² · A · (w - 2w) · h, so ∂ar/∂w = 8/π² · A · h and ∂ar/∂h = -8/π² · A · w: the exact
    ∂v/∂w = -8/π² · A · h / (w² + h²) with the 1/(w² + h²) dropped (as the CIoU paper says) but
    with the opposite sign. Only its gradient is used (:func:`ciou_loss`).
    """
    w = pred[..., 2] - pred[..., 0]
    h = pred[..., 3] - pred[..., 1]
    with torch.no_grad():
        angle_gap = _aspect_angle(target, eps) - _aspect_angle(pred, eps)
        twice_w = 2.0 * w
    return (8.0 / math.pi**2) * angle_gap * (w - twice_w) * h


def ciou_loss(pred: Tensor, target: Tensor, reduction: str = "none", eps: float = 1e-7,
              v_grad: str = "exact") -> Tensor:
    """1 - CIoU, CIoU = DIoU - α·v [DIoU, Complete IoU loss].

    v = 4/π² (atan(wg/hg) - atan(w/h))², α = v / ((1 - IoU) + v + eps) without gradient.
    pred, target: Tensor[N, 4] xyxy -> Tensor[N].

    ``v_grad``: exact (v differentiated as written, the paper's formula) | reference (the DIoU
    code's ``compute_ciou``: same value here, but v's gradient is that of
    :func:`_seed_aspect_surrogate`, whose aspect-ratio gradient has the opposite sign; the
    published CIoU numbers were trained with it). The DIoU code's logged loss value uses the
    surrogate's value too; ours stays 1 - CIoU so both settings log comparable losses.

    Written here rather than taken from torchvision's ``complete_box_iou_loss``, which ignores
    ``eps`` in its DIoU part and divides w/h unguarded (NaN for zero-height boxes). The DIoU
    reference code's α = v / ((1 - IoU) + v) is 0/0 for identical boxes; eps makes it 0.
    """
    if v_grad not in CIOU_V_GRADS:
        raise ValueError(f"v_grad must be one of {', '.join(CIOU_V_GRADS)}, got {v_grad!r}")
    pred, target = at_least_float32(pred), at_least_float32(target)
    iou = paired_iou(pred, target, eps)
    # DIoU part from torchvision: same formula and eps handling as in diou_loss above.
    loss_diou = distance_box_iou_loss(pred, target, reduction="none", eps=eps)
    v = (4.0 / math.pi**2) * (_aspect_angle(target, eps) - _aspect_angle(pred, eps)).square()
    with torch.no_grad():
        alpha = v / ((1.0 - iou) + v + eps)
    if v_grad == "reference":  # v's value, the surrogate's gradient
        surrogate = _seed_aspect_surrogate(pred, target, eps)
        v = v.detach() + (surrogate - surrogate.detach())
    return _reduce(loss_diou + alpha * v, reduction)


def smooth_l1_delta_loss(pred: Tensor, target: Tensor, reduction: str = "sum",
                         beta: float = 1.0 / 9.0) -> Tensor:
    """Smooth-L1 of encoded deltas: 0.5·x²/β for |x| < β, else |x| - 0.5·β (β = 0: L1).
    pred, target: Tensor[P, 4] -> summed over coordinates (and pairs, ``reduction="sum"``)."""
    return F.smooth_l1_loss(pred, target, beta=beta, reduction=reduction)


def l1_delta_loss(pred: Tensor, target: Tensor, reduction: str = "sum") -> Tensor:
    """|pred - target| of encoded deltas: Tensor[P, 4] -> summed over coordinates (and pairs)."""
    return F.l1_loss(pred, target, reduction=reduction)


# The name -> callable table for the config edge only (STYLE.md habit 3).
BOX_LOSSES: dict[str, Callable[..., Tensor]] = {
    "iou": iou_loss,
    "giou": giou_loss,
    "diou": diou_loss,
    "ciou": ciou_loss,
}


# Losses on the encoded deltas (not on decoded boxes); the factory binds smooth_l1's beta.
DELTA_LOSSES: dict[str, Callable[..., Tensor]] = {
    "smooth_l1": smooth_l1_delta_loss,
    "l1": l1_delta_loss,
}
