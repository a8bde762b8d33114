"""Optimization-based box refinement (IoUNet): gradient ascent on predicted IoU w.r.t. the box.

Shape glossary: D boxes over the whole batch (all images at once: no per-image loop), A ≤ D the
boxes still active at a step.

    b ← boxes;  iou ← f(b)
    repeat T times while any box is active:
        g  = ∂ Σ iou_active / ∂ b                  (torch.autograd.grad: no parameter .grad)
        b' = b + λ · g · [w, h, w, h]              (step scaled by the box size)
        b' made valid: inside the image, x2 > x1, y2 > y1 (else the box keeps b and stops)
        iou' = f(b')
        a box stops if |iou' − iou| < Ω1 or iou' − iou < Ω2; active boxes take b', iou'

``f(boxes Tensor[A, 4], index Tensor[A]) -> Tensor[A]`` predicts the IoU of the active boxes,
differentiably (PrRoIPool + IoU head); ``index`` (ascending) says which of the D boxes they are, so
``f`` can find each box's image and class. Only active boxes are evaluated, and the last step
needs no gradient: the cost falls as boxes stop.

Under ``torch.autocast`` the boxes, their gradient and the predicted IoU stay float32 (at least):
``f`` may compute in a half type inside (PrRoIPool keeps float32 coordinates and returns the
RoI gradient in float32), but a step λ·g·w of a fraction of a pixel and the stop thresholds Ω1 =
0.001 would not survive bfloat16's 8 bits.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MIN_SIZE = 1e-2  # smallest width/height a refined box may have (pixels)

IoUFunction = Callable[[Tensor, Tensor], Tensor]


def _valid(boxes: Tensor, limits: Tensor) -> tuple[Tensor, Tensor]:
    """Clamp to the image; limits Tensor[D, 2] = (W, H) per box. Returns (boxes, ok Tensor[D])."""
    x1 = torch.minimum(boxes[:, 0].clamp(min=0), limits[:, 0])
    y1 = torch.minimum(boxes[:, 1].clamp(min=0), limits[:, 1])
    x2 = torch.minimum(boxes[:, 2].clamp(min=0), limits[:, 0])
    y2 = torch.minimum(boxes[:, 3].clamp(min=0), limits[:, 1])
    out = torch.stack([x1, y1, x2, y2], 1)
    ok = (x2 - x1 >= MIN_SIZE) & (y2 - y1 >= MIN_SIZE)
    return out, ok


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _iou_and_grad(f: IoUFunction, boxes: Tensor, index: Tensor, need_grad: bool = True
                  ) -> tuple[Tensor, Tensor | None]:
    """(iou Tensor[A], d iou / d boxes Tensor[A, 4] or None), in the boxes' dtype (>= float32)."""
    if not need_grad:
        with torch.no_grad():
            return _at_least_float32(f(boxes, index)), None
    with torch.enable_grad():
        b = boxes.detach().requires_grad_(True)
        iou = _at_least_float32(f(b, index))
        (grad,) = torch.autograd.grad(iou.sum(), b)
    return iou.detach(), grad


def refine_boxes(boxes: Tensor, f: IoUFunction, image_wh: Tensor, lam: float,
                 steps: int, omega1: float = 0.001, omega2: float = -0.01) -> tuple[Tensor, Tensor]:
    """boxes Tensor[D, 4] xyxy, image_wh Tensor[D, 2] (width, height of each box's image) →
    (refined boxes Tensor[D, 4], their predicted IoU Tensor[D]). ``steps = 0`` returns the boxes
    and their IoU unchanged. Each box's IoU depends only on its own coordinates, so one backward
    pass over the sum serves every active box."""
    boxes = _at_least_float32(boxes.detach()).clone()
    if boxes.numel() == 0:
        return boxes, boxes.new_zeros((0,))
    limits = image_wh.to(boxes)
    index = torch.arange(len(boxes), device=boxes.device)  # the active boxes
    iou_a, grad_a = _iou_and_grad(f, boxes, index, need_grad=steps > 0)
    iou = iou_a.clone()
    for step in range(steps):
        b = boxes[index]
        wh = (b[:, 2:] - b[:, :2]).repeat(1, 2)
        proposal, ok = _valid(b + lam * grad_a * wh, limits[index])
        new_iou, new_grad = _iou_and_grad(f, proposal, index, need_grad=step + 1 < steps)
        delta = new_iou - iou_a
        stop = (delta.abs() < omega1) | (delta < omega2) | ~ok
        boxes[index[ok]] = proposal[ok]
        iou[index[ok]] = new_iou[ok]
        go = ~stop
        if new_grad is None or not bool(go.any()):  # the last step, or every box stopped
            break
        index, iou_a, grad_a = index[go], new_iou[go], new_grad[go]
    return boxes, iou
