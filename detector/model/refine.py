"""Optimization-based box refinement (IoUNet): gradient ascent on predicted IoU w.r.t. the box.

Shape glossary: D boxes over the whole batch (all images at once: no per-image loop).

    b ← boxes;  iou ← f(b)
    repeat T times while any box is active:
        g  = ∂ Σ iou_active / ∂ b                  (torch.autograd.grad: no parameter .grad)
        b' = b + λ · g · [w, h, w, h]              (step scaled by the box size)
        b' made valid: inside the image, x2 > x1, y2 > y1 (else the box keeps b and stops)
        iou' = f(b')
        a box stops if |iou' − iou| < Ω1 or iou' − iou < Ω2; active boxes take b', iou'

``f`` maps boxes Tensor[D, 4] to predicted IoU Tensor[D], differentiably (PrRoIPool + IoU head).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

MIN_SIZE = 1e-2  # smallest width/height a refined box may have (pixels)


def _valid(boxes: Tensor, limits: Tensor) -> tuple[Tensor, Tensor]:
    """Clamp to the image; limits Tensor[D, 2] = (W, H) per box. Returns (boxes, ok Tensor[D])."""
    x1 = torch.minimum(boxes[:, 0].clamp(min=0), limits[:, 0])
    y1 = torch.minimum(boxes[:, 1].clamp(min=0), limits[:, 1])
    x2 = torch.minimum(boxes[:, 2].clamp(min=0), limits[:, 0])
    y2 = torch.minimum(boxes[:, 3].clamp(min=0), limits[:, 1])
    out = torch.stack([x1, y1, x2, y2], 1)
    ok = (x2 - x1 >= MIN_SIZE) & (y2 - y1 >= MIN_SIZE)
    return out, ok


def _iou_and_grad(f: Callable[[Tensor], Tensor], boxes: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        b = boxes.detach().requires_grad_(True)
        iou = f(b)
        (grad,) = torch.autograd.grad(iou.sum(), b)
    return iou.detach(), grad


def refine_boxes(boxes: Tensor, f: Callable[[Tensor], Tensor], image_wh: Tensor, lam: float,
                 steps: int, omega1: float = 0.001, omega2: float = -0.01) -> tuple[Tensor, Tensor]:
    """boxes Tensor[D, 4] xyxy, image_wh Tensor[D, 2] (width, height of each box's image) →
    (refined boxes Tensor[D, 4], their predicted IoU Tensor[D]). ``steps = 0`` returns the boxes
    and their IoU unchanged. The gradient of inactive boxes is ignored (each box's IoU depends only
    on its own coordinates, so one backward pass over the sum serves every box)."""
    boxes = boxes.detach()
    if boxes.numel() == 0:
        return boxes, boxes.new_zeros((0,))
    limits = image_wh.to(boxes)
    if steps == 0:
        with torch.no_grad():
            return boxes, f(boxes)
    iou, grad = _iou_and_grad(f, boxes)
    active = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    for _ in range(steps):
        if not bool(active.any()):
            break
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        proposal, ok = _valid(boxes + lam * grad * wh, limits)
        new_iou, new_grad = _iou_and_grad(f, proposal)
        delta = new_iou - iou
        stop = (delta.abs() < omega1) | (delta < omega2) | ~ok
        take = active & ok
        boxes = torch.where(take[:, None], proposal, boxes)
        iou = torch.where(take, new_iou, iou)
        grad = torch.where(take[:, None], new_grad, grad)
        active = active & ~stop
    return boxes, iou
