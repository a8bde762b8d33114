"""Greedy NMS variants torchvision lacks: DIoU-NMS and IoU-guided NMS, exact and vectorised.

Shapes: N boxes (xyxy, no +1 pixel), Q box pairs. "Rank" is a box's position in the processing
order (by score for DIoU-NMS, by predicted IoU or IoU x score for IoU-guided NMS).

torchvision's ``nms`` is a C++ greedy loop with a fixed criterion. These variants change the
criterion (DIoU-NMS) or the order and the scores (IoU-guided NMS), so they are written here. A
Python loop over boxes would be ~100x slower than torchvision; instead three vectorised steps give
exactly the greedy result:

1. Candidate pairs (:func:`_overlapping_pairs`). A pair can only suppress if IoU > t (for
   DIoU-NMS because (d²/c²)^β ≥ 0). With boxes sorted by (class, x1), box b after box a can only
   reach IoU > t ≥ 0 if their x-overlap exceeds t·w_a, so x1_b < x2_a - t·w_a: each box meets a
   contiguous run of its successors (a sweep line). IoU is computed on those pairs only, not on
   all N² — on clustered detections that is ~5x fewer than all same-class pairs.
2. The criterion on the pairs left, each pair oriented from the better-ranked box i to j.
3. Greedy selection as a fixed point (:func:`_greedy_keep`): j is kept iff no *kept* i ranked
   before it suppresses it. keep[j] depends only on keep of better-ranked boxes, so this system
   has exactly one solution, which is what the greedy loop computes. Iterating keep <- F(keep) from
   "all kept" (Cluster-NMS, Zheng et al., arXiv:2005.03572) makes at least the best r+1 ranks final
   after r rounds, so it stops within N rounds; in practice after the longest suppression chain
   (< 10 rounds on 2000 detections).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_diou_nms", "batched_iou_guided_nms", "diou_nms", "iou_guided_nms"]

# Pairs whose IoU is computed at once: bounds the temporaries (~1 MB) and keeps each elementwise
# op at ATen's parallel grain (32768), so no thread-pool wake-up per op on a busy machine.
_CHUNK_PAIRS = 1 << 15
# The sweep's bound is loosened by 1% of t·w_a so float rounding in the IoU cannot make the
# bound drop a pair whose computed IoU is just above t.
_SWEEP_SLACK = 0.99


def _upcast(boxes: Tensor) -> Tensor:
    # Half-precision boxes: areas and ratios in float32, like the losses.
    return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()


def _take(values: Tensor, index: Tensor) -> Tensor:
    # index_select: several times faster than advanced indexing (values[index]) on CPU.
    return values.index_select(0, index)


def _empty_keep(boxes: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.int64, device=boxes.device)


def _sweep_counts(x1: Tensor, x2: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """For boxes sorted by (group, x1): how many successors can still overlap enough.

    x1, x2, groups: Tensor[N] (groups dense 0..G-1, non-decreasing) -> Tensor[N] int64.
    Keys are made exact integers (x1 -> its rank among all x1) so the group offset cannot eat
    the precision of large coordinates.
    """
    n = x1.numel()
    if iou_threshold >= 0:
        bound = x2 - (_SWEEP_SLACK * iou_threshold) * (x2 - x1)
    else:  # IoU 0 already beats a negative threshold: every same-group successor is a candidate.
        bound = torch.full_like(x2, float("inf"))
    sorted_x1 = x1.sort().values
    offset = groups * (n + 1)
    key = offset + torch.searchsorted(sorted_x1, x1, right=True)
    limit = offset + torch.searchsorted(sorted_x1, bound, right=True)
    end = torch.searchsorted(key, limit, right=True)  # one past the last candidate successor
    return (end - torch.arange(1, n + 1, device=x1.device)).clamp_(min=0)


def _chunk_pairs_iou(cols: Tensor, area: Tensor, counts: Tensor, start: int, stop: int,
                     iou_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """IoU of rows start..stop-1 with their next counts[row] boxes; keep pairs with IoU > t.

    cols: Tensor[4, N] sorted boxes as columns; area: Tensor[N]; counts: Tensor[N].
    Returns a, b: Tensor[Q] int64 sorted positions (a < b) and iou: Tensor[Q].
    """
    cnt = counts[start:stop]
    rows = torch.arange(start, stop, device=cols.device)
    a = torch.repeat_interleave(rows, cnt)
    # b runs a+1, a+2, ... within each row: arange minus the row's first pair slot, plus a+1.
    shift = rows + 1 - (cnt.cumsum(0) - cnt)
    b = torch.arange(a.numel(), device=cols.device) + torch.repeat_interleave(shift, cnt)
    x1, y1, x2, y2 = cols
    # x1[b] >= x1[a] by the sort, so max(x1[a], x1[b]) = x1[b].
    iw = torch.minimum(_take(x2, a), _take(x2, b)).sub_(_take(x1, b)).clamp_(min=0)
    ih = torch.minimum(_take(y2, a), _take(y2, b)).sub_(
        torch.maximum(_take(y1, a), _take(y1, b))).clamp_(min=0)
    inter = iw.mul_(ih)
    iou = inter / _take(area, a).add_(_take(area, b)).sub_(inter)
    hit = (iou > iou_threshold).nonzero().squeeze(1)
    return _take(a, hit), _take(b, hit), _take(iou, hit)


def _overlapping_pairs(boxes: Tensor, labels: Tensor | None,
                       iou_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Every pair of boxes with the same label and IoU > iou_threshold, each pair once.

    boxes: Tensor[N, 4] float; labels: Tensor[N] int or None (one class).
    Returns a, b: Tensor[Q] int64 indices into ``boxes`` (unordered) and their IoU: Tensor[Q].
    Zero-area pairs have IoU NaN and are never returned (as in torchvision's nms).
    """
    order = boxes[:, 0].argsort(stable=True)
    if labels is None:
        groups = torch.zeros_like(order)
    else:
        order = order[labels[order].argsort(stable=True)]
        lab = labels[order]
        groups = torch.cat([lab.new_zeros(1), (lab[1:] != lab[:-1]).cumsum(0)])
    cols = boxes[order].t().contiguous()
    counts = _sweep_counts(cols[0], cols[2], groups, iou_threshold)
    area = (cols[2] - cols[0]) * (cols[3] - cols[1])
    # Split rows into chunks of about _CHUNK_PAIRS pairs each.
    cum = counts.cumsum(0)
    marks = torch.arange(_CHUNK_PAIRS, max(int(cum[-1]), _CHUNK_PAIRS), _CHUNK_PAIRS,
                         device=cum.device)
    bounds = [0, *torch.searchsorted(cum, marks, right=True).tolist(), counts.numel()]
    parts = [_chunk_pairs_iou(cols, area, counts, lo, hi, iou_threshold)
             for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    a, b, iou = (torch.cat(p) for p in zip(*parts))
    return _take(order, a), _take(order, b), iou


def _center_distance_ratio(boxes: Tensor, a: Tensor, b: Tensor, eps: float = 1e-7) -> Tensor:
    """d²/c² per pair: centre distance over enclosing-box diagonal, squared.

    boxes: Tensor[N, 4]; a, b: Tensor[Q] indices -> Tensor[Q] in [0, 1]. eps keeps two
    coincident points at 0 instead of 0/0.
    """
    pa, pb = _take(boxes, a), _take(boxes, b)
    d2 = ((pa[:, :2] + pa[:, 2:]) - (pb[:, :2] + pb[:, 2:])).square_().sum(1).mul_(0.25)
    c2 = (torch.maximum(pa[:, 2:], pb[:, 2:]) - torch.minimum(pa[:, :2], pb[:, :2])).square_().sum(1)
    return d2.div_(c2.add_(eps))


def _oriented(order: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pairs of box indices -> (better rank, worse rank), both Tensor[Q] rank positions."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    ra, rb = _take(rank, a), _take(rank, b)
    return torch.minimum(ra, rb), torch.maximum(ra, rb)


def _greedy_keep(num: int, src: Tensor, dst: Tensor) -> Tensor:
    """The greedy NMS result from suppression pairs, as the fixed point of step 3 (module doc).

    src, dst: Tensor[Q] rank positions with src < dst ("src would suppress dst").
    Returns keep: Tensor[num] bool over rank positions.
    """
    keep = torch.ones(num, dtype=torch.bool, device=src.device)
    for _ in range(num + 1):  # at most num rounds change anything (proof in the module doc)
        hits = torch.bincount(dst, weights=_take(keep, src).to(torch.float32), minlength=num)
        new_keep = hits == 0
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def _diou_nms(boxes: Tensor, scores: Tensor, labels: Tensor | None, iou_threshold: float,
              beta: float) -> Tensor:
    if boxes.numel() == 0:
        return _empty_keep(boxes)
    boxes = _upcast(boxes)
    order = scores.argsort(descending=True, stable=True)
    a, b, iou = _overlapping_pairs(boxes, labels, iou_threshold)
    ratio = _center_distance_ratio(boxes, a, b)
    if beta != 1.0:
        ratio = ratio.pow_(beta)
    hit = (iou - ratio > iou_threshold).nonzero().squeeze(1)
    src, dst = _oriented(order, _take(a, hit), _take(b, hit))
    return order[_greedy_keep(order.numel(), src, dst)]


def diou_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, beta: float = 1.0) -> Tensor:
    """Greedy DIoU-NMS (Zheng et al., AAAI 2020, eq. 12) over one class.

    Box B is suppressed by a kept, higher-scoring M when IoU(M, B) - (d²/c²)^β > iou_threshold
    (strict, no +1 pixel; d: centre distance, c: enclosing-box diagonal). Centres far apart
    relative to the pair's extent lower the criterion, so adjacent objects survive.

    boxes: Tensor[N, 4] xyxy; scores: Tensor[N] -> keep: Tensor[K] int64, by decreasing score.
    """
    return _diou_nms(boxes, scores, None, iou_threshold, beta)


def batched_diou_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                     beta: float = 1.0) -> Tensor:
    """:func:`diou_nms` independently per category, like ``torchvision.ops.batched_nms``.

    boxes: Tensor[N, 4]; scores: Tensor[N]; idxs: Tensor[N] int category ids
    -> keep: Tensor[K] int64, by decreasing score. Pairs are only formed within a category
    (per-class blocks, not torchvision's coordinate offset: no N x N work across classes).
    """
    return _diou_nms(boxes, scores, idxs, iou_threshold, beta)


def _iou_guided_nms(boxes: Tensor, scores: Tensor, ious: Tensor, labels: Tensor | None,
                    iou_threshold: float, rank: str) -> tuple[Tensor, Tensor]:
    if rank == "iou":
        key = ious
    elif rank == "iou_x_score":
        key = ious * scores
    else:
        raise ValueError(f"rank must be 'iou' or 'iou_x_score', got {rank!r}")
    if boxes.numel() == 0:
        return _empty_keep(boxes), scores.new_empty(0)
    order = key.argsort(descending=True, stable=True)
    a, b, _ = _overlapping_pairs(_upcast(boxes), labels, iou_threshold)
    src, dst = _oriented(order, a, b)
    num = order.numel()
    keep = _greedy_keep(num, src, dst)
    # The greedy loop removes a box with the first kept box that overlaps it: its best-ranked
    # kept suppressor owns it. Kept boxes own themselves.
    live = keep[src]
    positions = torch.arange(num, device=order.device)
    owner = positions.scatter_reduce(0, dst[live], src[live], reduce="amin", include_self=True)
    ranked_scores = scores[order]
    best = ranked_scores.scatter_reduce(0, owner, ranked_scores, reduce="amax", include_self=True)
    kept = positions[keep]
    new_scores = best[kept]
    by_score = new_scores.argsort(descending=True, stable=True)
    return order[kept[by_score]], new_scores[by_score]


def iou_guided_nms(boxes: Tensor, scores: Tensor, ious: Tensor, iou_threshold: float = 0.5,
                   rank: str = "iou") -> tuple[Tensor, Tensor]:
    """IoU-guided NMS (Jiang et al., "Acquisition of Localization Confidence", ECCV 2018, alg. 1).

    Boxes are processed by predicted IoU (``rank="iou"``) or IoU x score (``"iou_x_score"``);
    greedy suppression with plain IoU > iou_threshold in that order; each kept box takes the max
    classification score over itself and the boxes it suppressed.

    boxes: Tensor[N, 4]; scores, ious: Tensor[N] -> keep: Tensor[K] int64 indices into the input,
    new_scores: Tensor[K] (aligned with keep), both by decreasing new score.
    """
    return _iou_guided_nms(boxes, scores, ious, None, iou_threshold, rank)


def batched_iou_guided_nms(boxes: Tensor, scores: Tensor, ious: Tensor, idxs: Tensor,
                           iou_threshold: float = 0.5, rank: str = "iou") -> tuple[Tensor, Tensor]:
    """:func:`iou_guided_nms` independently per category (idxs: Tensor[N] int category ids).

    Returns keep: Tensor[K] int64 and new_scores: Tensor[K], by decreasing new score over all
    categories.
    """
    return _iou_guided_nms(boxes, scores, ious, idxs, iou_threshold, rank)
