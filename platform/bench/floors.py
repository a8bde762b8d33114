"""The cost floors of `ioulab bench latency`: IoU-NMS and refinement reduced to their kernels, on the
boxes each stage actually processed, and the operators a refinement step dispatches.

Shape glossary: M candidates of an image, A boxes of one IoU evaluation, L FPN levels.

- IoU-NMS floor: the IoU prediction of the M candidates (PrRoIPool forward per level, IoU head
  forward, class column, decode) + ``batched_iou_guided_nms``, called directly.
- refine floor: for every IoU evaluation the refinement made (the first one and one per step taken),
  PrRoIPool forward per level + IoU head forward on its A active boxes and, where the step needed a
  gradient, the IoU head's input gradient + PrRoIPool's box-coordinate backward per level.

What a floor leaves out is the stage's overhead by definition: level assignment and grouping (done
before the clock starts), autograd graphs, splits and concatenations per image, host syncs, the
update and stop rules. Everything timed goes through :mod:`ioulab.platform.bench.timing`.

Operators per step: the ATen / ``ioulab`` operators the refinement dispatches (torch.profiler,
operators called inside another operator not counted: on a GPU each is about one kernel launch),
divided by the steps taken.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ioulab.detector.nms import batched_iou_guided_nms
from ioulab.detector.ops.poolers import LevelPool
from ioulab.platform.bench.timing import timed


class Recorder:
    """Stands in for ``heads.postprocess`` for one call: keeps its inputs, then calls it."""

    def __init__(self, post):
        self.post, self.candidate_boxes, self.inputs = post, post.candidate_boxes, None

    def __call__(self, heads, candidates, features, image_shapes):
        self.inputs = (candidates, features, image_shapes)
        return self.post(heads, candidates, features, image_shapes)


@dataclass
class Grouped:
    """One box set prepared for a floor: boxes grouped by level (``LevelPool`` state), the class
    columns (label − 1) in that order, and the order (None: box order)."""

    pool: LevelPool
    state: list
    columns: Tensor
    order: Tensor | None


def _group(heads, features, image_shapes, boxes: Tensor, labels: Tensor, image_index: Tensor) -> Grouped:
    pool = LevelPool(heads.iou_predictor.pooler, features, image_shapes)
    rois = torch.cat([image_index.to(boxes.dtype).unsqueeze(1), boxes], 1)
    _, order, state = pool.pool(rois)
    columns = (labels - 1).long()
    return Grouped(pool, state, columns if order is None else columns.index_select(0, order), order)


def _forward(heads, g: Grouped) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(pooled, h1, h2, iou) of a grouped box set: the kernels only."""
    pieces = [torch.ops.ioulab.prroi_pool(g.pool.features[level], r, float(g.pool.scales[level]),
                                          *g.pool.output_size) for (level, r), _ in g.state]
    pooled = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    h1, h2, raw = heads.iou_predictor.head.activations(pooled)
    raw = raw.gather(1, g.columns.unsqueeze(1)).squeeze(1)
    return pooled, h1, h2, heads.iou_predictor.loss.decode(raw)


def nms_floor(heads, candidates, features, image_shapes, nms, device) -> float:
    """Seconds of the IoU-NMS floor for one batch's candidates (``nms``: the ``IoUNMSPost``)."""
    prepared = []
    for i, (boxes, scores, labels) in enumerate(candidates):
        if len(boxes):
            g = _group(heads, features, image_shapes, boxes, labels, torch.full_like(labels, i))
            grouped = torch.cat([r[:, 1:] for (_, r), _ in g.state])
            prepared.append((g, grouped, scores if g.order is None else scores.index_select(0, g.order)))

    def run() -> None:
        for g, boxes, scores in prepared:
            iou = _forward(heads, g)[3]
            batched_iou_guided_nms(boxes, scores, iou, g.columns, nms.iou_threshold, nms.rank)

    with timed(device) as t, torch.no_grad():
        run()
    return t.seconds


def refine_floor(heads, features, image_shapes, kept, trace: list, device) -> float:
    """Seconds of the refinement floor for the IoU evaluations in ``trace`` (boxes, index,
    need_grad), made by ``RefinePost.refine`` on ``kept``."""
    labels = torch.cat([k[2] for k in kept])
    image_of = torch.repeat_interleave(torch.arange(len(kept), device=labels.device),
                                       torch.tensor([len(k[0]) for k in kept], device=labels.device))
    prepared = [(_group(heads, features, image_shapes, boxes.detach(), labels[index], image_of[index]), need_grad)
                for boxes, index, need_grad in trace]
    head, loss = heads.iou_predictor.head, heads.iou_predictor.loss

    def run() -> None:
        for g, need_grad in prepared:
            pooled, h1, h2, iou = _forward(heads, g)
            if need_grad:
                grad = head.input_grad(h1, h2, g.columns, loss.slope(iou)).view_as(pooled)
                g.pool.box_grad(g.state, grad)

    with timed(device) as t, torch.no_grad():
        run()
    return t.seconds


def count_ops(fn) -> int:
    """Operators ``fn()`` dispatches: ATen and ``ioulab`` ops not called from inside another op."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def is_op(e) -> bool:
        return e.name.startswith(("aten::", "ioulab::"))

    def nested(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if is_op(p):
                return True
            p = p.cpu_parent
        return False

    return sum(1 for e in prof.events() if is_op(e) and not nested(e))
