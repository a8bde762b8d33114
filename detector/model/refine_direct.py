"""The refinement of :mod:`refine` with the gradient computed directly (``inference.refine.impl =
direct``): the same steps, boxes and stop rules, the same numbers within float rounding, fewer
operators per step.

Shape glossary: D boxes over the whole batch, A ≤ D active boxes at a step, S the IoU head's
representation size, C·P·P the pooled features of a box.

Per step :func:`refine_boxes` of :mod:`refine` builds an autograd graph (pooler, level mapping per
image, head) and walks it back; here one evaluation (:class:`DirectIoU`) is

    levels of the A boxes, grouped once (one host sync)   PrRoIPool forward per level
    IoU head forward keeping its two ReLU outputs          IoU = decode(raw[label])
    ∂IoU/∂pooled: class row × decode slope, 2 ReLU masks, 2 matmuls  (IoUHead.input_grad)
    ∂IoU/∂boxes: PrRoIPool backward per level, box coordinates only  (LevelPool.box_grad)

and the loop keeps the active boxes' coordinates, IoU and gradient together, writing the accepted
values back with one ``index_copy_`` each (no boolean-mask indexing: that is a host sync per use on
a GPU). The two syncs left per step are the level counts and whether any box is still active.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ioulab.detector.model.refine import MIN_SIZE, _at_least_float32
from ioulab.detector.ops.poolers import LevelPool

# (boxes Tensor[A, 4], index Tensor[A], need_grad, their (w, h) Tensor[A, 2])
#     -> (iou Tensor[A], d iou / d boxes Tensor[A, 4] | None)
Evaluate = Callable[[Tensor, Tensor, bool, Tensor], tuple[Tensor, "Tensor | None"]]


@dataclass
class Prediction:
    """The IoU of A boxes computed in level order (``order``: level order → box index, None: box
    order), with what the gradient needs: the pooled features, the head's ReLU outputs, the class
    columns in level order and the pooler's state."""

    iou: Tensor
    order: Tensor | None
    columns: Tensor
    pooled: Tensor
    h1: Tensor
    h2: Tensor
    state: list


def predict_grouped(predictor, pool: LevelPool, rois: Tensor, columns: Tensor, sizes: Tensor | None = None,
                    columns_2d: Tensor | None = None) -> Prediction:
    """rois Tensor[A, 5], columns Tensor[A] int64 (label − 1) → :class:`Prediction`: the numbers
    of ``predictor(features, boxes, labels, image_shapes)`` without gathering pooled features back
    to box order (the caller puts the IoU back, :meth:`LevelPool.unsort`). Optional: the boxes'
    (w, h) Tensor[A, 2] and ``columns.unsqueeze(1)``, if the caller has them."""
    pooled, order, state = pool.pool(rois, sizes)
    if order is not None:
        columns, columns_2d = columns.index_select(0, order), None
    if columns_2d is None:
        columns_2d = columns.unsqueeze(1)
    h1, h2, raw = predictor.head.activations(pooled)
    iou = predictor.loss.decode(raw.gather(1, columns_2d).squeeze(1))  # select_class
    return Prediction(iou, order, columns, pooled, h1, h2, state)


class DirectIoU:
    """Predicted IoU of active boxes and its gradient w.r.t. their coordinates, no autograd.

    ``predictor``: the model's ``IoUPredictor`` (PrRoIPool pooler, IoU head, IoU loss); labels
    Tensor[D] (1..K) and image_of Tensor[D] (each box's image in the batch) of all D boxes;
    ``trace``: a list to which every evaluation appends (boxes, index, need_grad) (``ioulab bench
    latency`` times its floor on them)."""

    def __init__(self, predictor, features: dict[str, Tensor], labels: Tensor, image_of: Tensor,
                 image_shapes: list[tuple[int, int]], trace: list | None = None):
        self.pool = LevelPool(predictor.pooler, features, image_shapes)
        self.predictor = predictor
        self.columns, self.image_of, self.trace = (labels - 1).long(), image_of.unsqueeze(1), trace
        self._active: tuple = (None,) * 4  # (index, its image column, its class columns, the same [A, 1])

    def _gathered(self, index: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(image column Tensor[A, 1], class columns Tensor[A] and Tensor[A, 1]) of the active
        boxes, gathered once per active set (the loop passes the same ``index`` until a box stops)."""
        if self._active[0] is not index:
            if self.image_of.dtype != dtype:
                self.image_of = self.image_of.to(dtype)
            columns = self.columns.index_select(0, index)
            self._active = (index, self.image_of.index_select(0, index), columns, columns.unsqueeze(1))
        return self._active[1:]

    def __call__(self, boxes: Tensor, index: Tensor, need_grad: bool, sizes: Tensor | None = None
                 ) -> tuple[Tensor, Tensor | None]:
        if self.trace is not None:
            self.trace.append((boxes.clone(), index, need_grad))  # the first ones are updated in place
        image, columns, columns_2d = self._gathered(index, boxes.dtype)
        with torch.no_grad():
            p = predict_grouped(self.predictor, self.pool, torch.cat([image, boxes], 1), columns, sizes, columns_2d)
            grad = None
            if need_grad:
                head, slope = self.predictor.head, self.predictor.loss.slope(p.iou)
                g = head.input_grad(p.h1, p.h2, p.columns, slope).view_as(p.pooled)
                grad = self.pool.box_grad(p.state, g)
        inverse = LevelPool.inverse(p.order)
        if grad is not None:
            grad = LevelPool.unsort(grad, inverse)
        return LevelPool.unsort(_at_least_float32(p.iou), inverse), grad


def refine_boxes_direct(boxes: Tensor, evaluate: Evaluate, image_wh: Tensor, lam: float, steps: int,
                        omega1: float = 0.001, omega2: float = -0.01) -> tuple[Tensor, Tensor]:
    """:func:`refine.refine_boxes` with ``evaluate`` giving the IoU and its gradient directly.

    boxes Tensor[D, 4] xyxy, image_wh Tensor[D, 2] → (refined boxes Tensor[D, 4], IoU Tensor[D])."""
    boxes = _at_least_float32(boxes.detach()).clone()
    if boxes.numel() == 0:
        return boxes, boxes.new_zeros((0,))
    limits = image_wh.to(boxes).repeat(1, 2)  # (W, H, W, H) per box
    index = torch.arange(len(boxes), device=boxes.device)
    b, lim, size = boxes, limits, boxes[:, 2:] - boxes[:, :2]  # the active boxes, their limits and (w, h)
    iou_a, grad_a = evaluate(boxes, index, steps > 0, size)
    iou = iou_a.clone()
    for step in range(steps):
        proposal = torch.minimum((b + lam * grad_a * size.repeat(1, 2)).clamp(min=0), lim)
        new_size = proposal[:, 2:] - proposal[:, :2]
        ok = (new_size >= MIN_SIZE).all(1)
        new_iou, new_grad = evaluate(proposal, index, step + 1 < steps, new_size)
        delta = new_iou - iou_a
        go = ok > ((delta.abs() < omega1) | (delta < omega2))  # ok and not the reference's stop rule
        b = torch.where(ok.unsqueeze(1), proposal, b)
        iou_a = torch.where(ok, new_iou, iou_a)
        boxes.index_copy_(0, index, b)
        iou.index_copy_(0, index, iou_a)
        if new_grad is None:
            break
        active = torch.where(go)[0]  # the one host sync of the loop
        if len(active) == 0:
            break
        # an active box took its proposal (go implies ok): its size is new_size
        if len(active) < len(index):
            index, b, lim, size, iou_a, grad_a = (t.index_select(0, active)
                                                  for t in (index, b, lim, new_size, iou_a, new_grad))
        else:
            size, grad_a = new_size, new_grad
    return boxes, iou
