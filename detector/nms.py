"""Greedy NMS variants torchvision lacks: DIoU-NMS and IoU-guided NMS, exact and vectorised.

Shapes: N boxes (xyxy, no +1 pixel), Q box pairs. "Rank" is a box's position in the processing
order (by score for DIoU-NMS, by predicted IoU or IoU x score for IoU-guided NMS).

torchvision's ``nms`` is a C++ greedy loop with a fixed criterion. These variants change the
criterion (DIoU-NMS) or the order and the scores (IoU-guided NMS), so they are written here. A
Python loop over boxes would be ~100x slower than torchvision; instead three vectorised steps give
exactly the greedy result:

1. Candidate pairs (:func:`_sweep`, :func:`_chunk_overlaps`). A pair can only suppress if
   IoU > t (for DIoU-NMS because (d²/c²)^β ≥ 0). With boxes sorted by (class, x1), box b after
   box a can only reach IoU > t ≥ 0 if their x-overlap exceeds t·w_a, so x1_b < x2_a - t·w_a:
   each box meets a contiguous run of its successors (a sweep line). IoU is computed on those
   pairs only, in bounded chunks: on 2000 clustered detections in 5 classes that is ~110k pairs
   instead of ~420k same-class pairs or 4M for an N x N matrix.
2. The criterion on the pairs left (:func:`_suppressions`), each pair oriented from the
   better-ranked box i to the other, j.
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

from ioulab.detector.losses import at_least_float32

__all__ = ["batched_diou_nms", "batched_iou_guided_nms", "diou_nms", "iou_guided_nms"]

# Pairs whose IoU is computed at once: bounds the temporaries (~100 kB each) and keeps every op
# below ATen's parallel grain (32768 elements): on a busy 2-core machine one multi-threaded op
# waits milliseconds for the other core (measured: 3 ms per op, 100x the op itself).
_CHUNK_PAIRS = 32000
# The sweep's bound is loosened by 1% of t·w_a so float rounding in the IoU cannot make the
# bound drop a pair whose computed IoU is just above t.
_SWEEP_SLACK = 0.99
# Half-precision inputs (e.g. autocast outputs): areas, ratios and IoU x score are computed in
# float32 (at_least_float32), like the losses. Rounded values convert exactly, so the result is the
# float32 one on them.


def _take(values: Tensor, index: Tensor) -> Tensor:
    # index_select, not values[index]: advanced indexing measured 3-4x slower here, and it goes
    # multi-threaded at a few thousand elements (see _CHUNK_PAIRS).
    return values.index_select(0, index)


def _inverse(perm: Tensor) -> Tensor:
    """Inverse permutation: Tensor[N] -> Tensor[N], inverse[perm[i]] = i."""
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def _empty_keep(boxes: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.int64, device=boxes.device)


def _sweep(boxes: Tensor, labels: Tensor | None, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """Sort boxes by (label, x1) and count each box's candidate successors (step 1).

    boxes: Tensor[N, 4]; labels: Tensor[N] or None. Returns order: Tensor[N] int64 (the sort)
    and counts: Tensor[N] int64 (per sorted position: how many of the next boxes to pair with).

    One merged sort of the N x1 values and the N bounds does both: a bound's position among the
    sorted x1 values is one past its last candidate. Keys precede bounds at equal values (both
    stable sorts), so "x1 <= bound" is exact, and no float offset separates the labels.
    (A merge by sorting, not ``searchsorted`` of N queries: that op goes multi-threaded from 200
    queries on; see _CHUNK_PAIRS.)
    """
    n = boxes.shape[0]
    x1, x2 = boxes[:, 0], boxes[:, 2]
    if iou_threshold >= 0:
        bound = x2 - (_SWEEP_SLACK * iou_threshold) * (x2 - x1)
    else:  # IoU 0 already beats a negative threshold: every same-label successor is a candidate.
        bound = torch.full_like(x2, float("inf"))
    merged = torch.cat([x1, bound]).argsort(stable=True)
    if labels is not None:
        merged = _take(merged, _take(torch.cat([labels, labels]), merged).argsort(stable=True))
    is_key = merged < n
    order = _take(merged, is_key.nonzero().squeeze(1))
    is_bound = (~is_key).nonzero().squeeze(1)
    position = _inverse(order)
    end = torch.empty_like(order).scatter_(
        0, _take(position, _take(merged, is_bound).sub_(n)), _take(is_key.cumsum(0), is_bound))
    return order, (end - torch.arange(1, n + 1, device=end.device)).clamp_(min=0)


def _center_distance_ratio(box_a: list[Tensor], box_b: list[Tensor], eps: float = 1e-7) -> Tensor:
    """d²/c²: squared centre distance over squared enclosing-box diagonal, per pair.

    box_a, box_b: [x1, y1, x2, y2], each Tensor[Q] -> Tensor[Q] in [0, 1]. eps keeps two
    coincident points at 0 instead of 0/0.
    """
    x1a, y1a, x2a, y2a = box_a
    x1b, y1b, x2b, y2b = box_b
    d2 = (x1a + x2a - x1b - x2b).square_().add_((y1a + y2a - y1b - y2b).square_()).mul_(0.25)
    cw = torch.maximum(x2a, x2b).sub_(torch.minimum(x1a, x1b))
    ch = torch.maximum(y2a, y2b).sub_(torch.minimum(y1a, y1b))
    return d2.div_(cw.square_().add_(ch.square_()).add_(eps))


def _chunk_overlaps(cols: Tensor, area: Tensor, counts: Tensor, start: int,
                    iou_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Sweep rows start..start+R-1 against their next counts[r] boxes: pairs with IoU > t.

    cols: Tensor[4, N] boxes in sweep order, as columns; area: Tensor[N]; counts: Tensor[R].
    Returns a, b: Tensor[Q] sweep positions (a < b) and iou: Tensor[Q].
    """
    # Pair slots without repeat_interleave (multi-threaded from a few hundred rows on, see
    # _CHUNK_PAIRS): mark each row's first slot, a running count gives every slot's row.
    first = counts.cumsum(0).sub_(counts)
    num_pairs = int(first[-1] + counts[-1])
    marks = torch.zeros(num_pairs + 1, dtype=torch.int64, device=counts.device)
    row = marks.index_add_(0, first, torch.ones_like(first)).cumsum_(0)[:num_pairs].sub_(1)
    a = row + start
    # b runs a+1, a+2, ... along each row.
    b = torch.arange(1 + start, num_pairs + 1 + start, device=counts.device).add_(
        _take(torch.arange(counts.numel(), device=counts.device).sub_(first), row))
    x1, y1, x2, y2 = cols
    # x1[b] >= x1[a] by the sort, so the intersection starts at x1[b].
    iw = torch.minimum(_take(x2, a), _take(x2, b)).sub_(_take(x1, b)).clamp_(min=0)
    ih = torch.minimum(_take(y2, a), _take(y2, b)).sub_(
        torch.maximum(_take(y1, a), _take(y1, b))).clamp_(min=0)
    inter = iw.mul_(ih)
    iou = inter.div_(_take(area, a).add_(_take(area, b)).sub_(inter))
    hit = (iou > iou_threshold).nonzero().squeeze(1)
    return _take(a, hit), _take(b, hit), _take(iou, hit)


def _diou_filter(cols: Tensor, a: Tensor, b: Tensor, iou: Tensor, iou_threshold: float,
                 beta: float) -> tuple[Tensor, Tensor]:
    """Keep the pairs with IoU - (d²/c²)^β > t. cols: Tensor[4, N]; a, b, iou: Tensor[Q]."""
    ratio = _center_distance_ratio([_take(c, a) for c in cols], [_take(c, b) for c in cols])
    if beta != 1.0:
        ratio = ratio.pow_(beta)
    hit = (iou.sub_(ratio) > iou_threshold).nonzero().squeeze(1)
    return _take(a, hit), _take(b, hit)


def _slices(total: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + _CHUNK_PAIRS, total)) for lo in range(0, total, _CHUNK_PAIRS)]


def _suppressions(boxes: Tensor, labels: Tensor | None, order: Tensor, iou_threshold: float,
                  beta: float | None) -> tuple[Tensor, Tensor]:
    """Every same-label pair whose criterion exceeds iou_threshold, each pair once (steps 1-2).

    boxes: Tensor[N, 4] float; labels: Tensor[N] int or None (one class); order: Tensor[N] the
    processing order (best first). beta None: criterion IoU (IoU-guided NMS); otherwise
    IoU - (d²/c²)^β (DIoU-NMS). Returns src, dst: Tensor[Q] rank positions (src < dst: src
    would suppress dst). Zero-area pairs have IoU NaN and never suppress (as torchvision's nms).
    """
    sweep, counts = _sweep(boxes, labels, iou_threshold)
    cols = _take(boxes, sweep).t().contiguous()
    area = (cols[2] - cols[0]) * (cols[3] - cols[1])
    # Rows in chunks of about _CHUNK_PAIRS pairs (a row with more pairs comes alone).
    cum = counts.cumsum(0)
    marks = torch.arange(_CHUNK_PAIRS, max(int(cum[-1]), _CHUNK_PAIRS), _CHUNK_PAIRS,
                         device=cum.device)
    cuts = [0, *torch.searchsorted(cum, marks, right=True).tolist(), counts.numel()]
    parts = [_chunk_overlaps(cols, area, counts[lo:hi], lo, iou_threshold)
             for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]
    a, b, iou = (torch.cat(p) for p in zip(*parts))
    if beta is not None:
        # (d²/c²)^β >= 0, so IoU > t was necessary: the distance only on those pairs.
        parts = [_diou_filter(cols, a[lo:hi], b[lo:hi], iou[lo:hi], iou_threshold, beta)
                 for lo, hi in _slices(a.numel())]
        a, b = (torch.cat(p) for p in zip(*parts)) if parts else (a, b)
    ranks = _take(_inverse(order), sweep)
    ra, rb = _take(ranks, a), _take(ranks, b)
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
    order = scores.argsort(descending=True, stable=True)
    src, dst = _suppressions(at_least_float32(boxes), labels, order, iou_threshold, beta)
    return _take(order, _greedy_keep(order.numel(), src, dst).nonzero().squeeze(1))


def diou_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, beta: float = 1.0) -> Tensor:
    """Greedy DIoU-NMS (Zheng et al., "Distance-IoU Loss", AAAI 2020, Sec. DIoU-NMS), one class.

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
    -> keep: Tensor[K] int64, by decreasing score. Boxes are sorted by category before the
    sweep, so pairs only form within one. torchvision's coordinate-offset trick (shift each class
    apart, run the one-class op) forms the same pairs and measured the same within noise
    (``ioulab bench nms``: ±15% either way), but shifted float32 coordinates round differently,
    so borderline IoUs could flip: exact per-class sorting was kept.
    """
    return _diou_nms(boxes, scores, idxs, iou_threshold, beta)


def _iou_guided_nms(boxes: Tensor, scores: Tensor, ious: Tensor, labels: Tensor | None,
                    iou_threshold: float, rank: str) -> tuple[Tensor, Tensor]:
    # IoU x score of half-type inputs in float32: a bfloat16 product would create rank ties.
    scores, ious = at_least_float32(scores), at_least_float32(ious)
    if rank == "iou":
        key = ious
    elif rank == "iou_x_score":
        key = ious * scores
    else:
        raise ValueError(f"rank must be 'iou' or 'iou_x_score', got {rank!r}")
    if boxes.numel() == 0:
        return _empty_keep(boxes), scores.new_empty(0)
    order = key.argsort(descending=True, stable=True)
    src, dst = _suppressions(at_least_float32(boxes), labels, order, iou_threshold, None)
    num = order.numel()
    keep = _greedy_keep(num, src, dst)
    # The greedy loop removes a box with the first kept box that overlaps it: its best-ranked
    # kept suppressor owns it. Kept boxes own themselves.
    live = _take(keep, src).nonzero().squeeze(1)
    positions = torch.arange(num, device=order.device)
    owner = positions.scatter_reduce(0, _take(dst, live), _take(src, live), reduce="amin",
                                     include_self=True)
    ranked_scores = _take(scores, order)
    best = ranked_scores.scatter_reduce(0, owner, ranked_scores, reduce="amax", include_self=True)
    kept = keep.nonzero().squeeze(1)
    new_scores = _take(best, kept)
    by_score = new_scores.argsort(descending=True, stable=True)
    return _take(order, _take(kept, by_score)), _take(new_scores, by_score)


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
