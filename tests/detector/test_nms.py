"""DIoU-NMS and IoU-guided NMS: REFERENCE.md cases, naive greedy loops, torchvision, edge cases."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms, nms

import ioulab.detector.nms as nms_module
from ioulab.detector.nms import (batched_diou_nms, batched_iou_guided_nms, diou_nms,
                                 iou_guided_nms)

EPS = 1e-7


def clustered_boxes(seed, num_boxes=300, num_objects=8, num_classes=3, dtype=torch.float64):
    """Detector-like boxes jittered around a few objects; scores, ious in [0, 1]; labels."""
    g = torch.Generator().manual_seed(seed)
    obj_wh = 10 + 90 * torch.rand(num_objects, 2, generator=g, dtype=torch.float64)
    obj_ctr = 150 * torch.rand(num_objects, 2, generator=g, dtype=torch.float64) + obj_wh
    obj = torch.randint(num_objects, (num_boxes,), generator=g)
    ctr = obj_ctr[obj] + 0.15 * obj_wh[obj] * torch.randn(num_boxes, 2, generator=g,
                                                          dtype=torch.float64)
    wh = obj_wh[obj] * torch.exp(0.2 * torch.randn(num_boxes, 2, generator=g, dtype=torch.float64))
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1).to(dtype)
    scores = torch.rand(num_boxes, generator=g)
    ious = torch.rand(num_boxes, generator=g)
    labels = torch.randint(num_classes, (num_boxes,), generator=g)
    return boxes, scores, ious, labels


# ---- naive greedy references in plain Python floats ----------------------------------------
def _iou(p, q):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)


def _diou_criterion(p, q, beta):
    d2 = ((p[0] + p[2] - q[0] - q[2]) ** 2 + (p[1] + p[3] - q[1] - q[3]) ** 2) / 4
    c2 = (max(p[2], q[2]) - min(p[0], q[0])) ** 2 + (max(p[3], q[3]) - min(p[1], q[1])) ** 2
    return _iou(p, q) - (d2 / (c2 + EPS)) ** beta


def naive_greedy(boxes, key, labels, suppresses):
    """Textbook greedy NMS: [(kept index, [indices it suppressed])] in processing order."""
    b, k = boxes.tolist(), key.tolist()
    lab = labels.tolist() if labels is not None else [0] * len(b)
    order = sorted(range(len(b)), key=lambda i: -k[i])  # stable, like argsort(stable=True)
    removed = [False] * len(b)
    result = []
    for pos, i in enumerate(order):
        if removed[i]:
            continue
        taken = []
        for j in order[pos + 1:]:
            if not removed[j] and lab[j] == lab[i] and suppresses(b[i], b[j]):
                removed[j] = True
                taken.append(j)
        result.append((i, taken))
    return result


def naive_diou_nms(boxes, scores, labels, thr, beta):
    kept = naive_greedy(boxes, scores, labels, lambda p, q: _diou_criterion(p, q, beta) > thr)
    return torch.tensor([i for i, _ in kept], dtype=torch.int64)


def naive_iou_guided_nms(boxes, scores, ious, labels, thr, rank):
    key = ious if rank == "iou" else ious * scores
    s = scores.tolist()
    kept = naive_greedy(boxes, key, labels, lambda p, q: _iou(p, q) > thr)
    with_scores = [(i, max([s[i]] + [s[j] for j in taken])) for i, taken in kept]
    with_scores.sort(key=lambda item: -item[1])  # stable: ties stay in processing order
    keep = torch.tensor([i for i, _ in with_scores], dtype=torch.int64)
    return keep, torch.tensor([v for _, v in with_scores], dtype=scores.dtype)


# ---- REFERENCE.md, "DIoU-NMS" ------------------------------------------------------------
M_BOX = [0.0, 0.0, 10.0, 10.0]
# B, beta, criterion, suppressed at threshold 0.5
REFERENCE_CASES = [
    ([3.0, 0.0, 13.0, 10.0], 1.0, 0.505004, True),
    ([3.0, 0.0, 13.0, 10.0], 0.9, 0.491468, False),
    ([3.3, 0.0, 13.3, 10.0], 1.0, 0.464430, False),
    ([5.0, 0.0, 15.0, 10.0], 1.0, 0.256410, False),
]


def _pair(other):
    return torch.tensor([M_BOX, other]), torch.tensor([0.9, 0.8])


@pytest.mark.parametrize("other,beta,criterion,suppressed", REFERENCE_CASES)
def test_reference_cases(other, beta, criterion, suppressed):
    boxes, scores = _pair(other)
    assert _diou_criterion(M_BOX, other, beta) == pytest.approx(criterion, abs=1e-6)
    keep = diou_nms(boxes, scores, 0.5, beta=beta)
    assert keep.tolist() == ([0] if suppressed else [0, 1])
    # The criterion itself, through the public op: B goes exactly when threshold < criterion.
    assert diou_nms(boxes, scores, criterion - 1e-5, beta=beta).tolist() == [0]
    assert diou_nms(boxes, scores, criterion + 1e-5, beta=beta).tolist() == [0, 1]


def test_reference_case_plain_nms_suppresses_what_diou_keeps():
    boxes, scores = _pair([3.3, 0.0, 13.3, 10.0])  # IoU 0.503759 > 0.5, criterion 0.464430
    assert nms(boxes, scores, 0.5).tolist() == [0]
    assert diou_nms(boxes, scores, 0.5).tolist() == [0, 1]


def test_strict_threshold_and_no_plus_one():
    # IoU exactly 0.5 (no +1 pixel: [0,10] and [0,5] overlap 5 of 10), concentric: criterion 0.5.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 2.5, 10.0, 7.5]])
    scores = torch.tensor([0.9, 0.8])
    assert diou_nms(boxes, scores, 0.5).tolist() == [0, 1]  # 0.5 > 0.5 is false
    assert diou_nms(boxes, scores, 0.49).tolist() == [0]


# ---- against torchvision and naive loops --------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_negligible_distance_term_equals_torchvision_nms(seed):
    boxes, scores, _, labels = clustered_boxes(seed, num_boxes=500, dtype=torch.float32)
    # (d²/c²)^β underflows to 0 for d < c: DIoU-NMS becomes plain greedy NMS.
    for thr in (0.3, 0.5, 0.7):
        expected = nms(boxes, scores, thr)
        assert torch.equal(diou_nms(boxes, scores, thr, beta=1e4), expected)
        assert torch.equal(batched_diou_nms(boxes, scores, labels, thr, beta=1e4),
                           batched_nms(boxes, scores, labels, thr))


@pytest.mark.parametrize("beta", [1.0, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_diou_nms_equals_naive_greedy(seed, beta):
    boxes, scores, _, labels = clustered_boxes(seed)
    keep = diou_nms(boxes, scores, 0.5, beta)
    assert keep.dtype == torch.int64
    assert torch.equal(keep, naive_diou_nms(boxes, scores, None, 0.5, beta))
    assert (scores[keep].diff() <= 0).all()  # by decreasing score
    # The distance term matters on this data: DIoU keeps boxes plain NMS drops.
    assert keep.numel() > nms(boxes.float(), scores, 0.5).numel()


@pytest.mark.parametrize("beta", [1.0, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_batched_diou_nms_equals_naive_greedy_per_class(seed, beta):
    boxes, scores, _, labels = clustered_boxes(seed)
    keep = batched_diou_nms(boxes, scores, labels, 0.5, beta)
    assert torch.equal(keep, naive_diou_nms(boxes, scores, labels, 0.5, beta))


def test_chunked_pair_path_equals_naive_greedy(monkeypatch):
    # Tiny chunks: many row chunks and several distance slices, same result.
    monkeypatch.setattr(nms_module, "_CHUNK_PAIRS", 64)
    boxes, scores, ious, labels = clustered_boxes(7)
    assert torch.equal(batched_diou_nms(boxes, scores, labels, 0.5, 0.9),
                       naive_diou_nms(boxes, scores, labels, 0.5, 0.9))
    keep, new_scores = batched_iou_guided_nms(boxes, scores, ious, labels, 0.5)
    expected_keep, expected_scores = naive_iou_guided_nms(boxes, scores, ious, labels, 0.5, "iou")
    assert torch.equal(keep, expected_keep)
    assert torch.equal(new_scores, expected_scores)


def test_detector_sized_input_equals_naive_greedy():
    # 2000 boxes in one class: several hundred thousand candidate pairs, many natural chunks.
    boxes, scores, ious, _ = clustered_boxes(11, num_boxes=2000, num_objects=30)
    assert torch.equal(diou_nms(boxes, scores, 0.5, 0.9),
                       naive_diou_nms(boxes, scores, None, 0.5, 0.9))
    keep, new_scores = iou_guided_nms(boxes, scores, ious, 0.5, "iou_x_score")
    expected_keep, expected_scores = naive_iou_guided_nms(boxes, scores, ious, None, 0.5,
                                                          "iou_x_score")
    assert torch.equal(keep, expected_keep)
    assert torch.equal(new_scores, expected_scores)


def test_negative_threshold_pairs_every_same_class_box():
    # Below 0 even disjoint boxes (IoU 0, criterion -(d²/c²)^β) can suppress: no sweep pruning.
    boxes, scores, _, labels = clustered_boxes(3, num_boxes=120)
    for thr in (-0.2, 0.0):
        assert torch.equal(batched_diou_nms(boxes, scores, labels, thr),
                           naive_diou_nms(boxes, scores, labels, thr, 1.0))


def test_long_suppression_chain():
    """Each box suppresses only its neighbour: ~N fixed-point rounds; greedy keeps every other."""
    n = 60
    x = torch.arange(n, dtype=torch.float64) * 2.0
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], dim=1)
    scores = torch.linspace(1.0, 0.1, n)
    # Neighbours: IoU 80/120, criterion 0.667 - 4/244 = 0.650 > 0.6; next-but-one: IoU 0.43 only.
    keep = diou_nms(boxes, scores, 0.6)
    assert keep.tolist() == list(range(0, n, 2))
    assert torch.equal(keep, naive_diou_nms(boxes, scores, None, 0.6, 1.0))


def test_degenerate_boxes_behave_like_torchvision():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5],
                          [1, 1, 11, 11], [20, 20, 20, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # Zero-area pairs have IoU 0/0: never suppressed, as in torchvision.
    assert torch.equal(diou_nms(boxes, scores, 0.5, beta=1e4), nms(boxes, scores, 0.5))
    assert diou_nms(boxes, scores, 0.5).tolist() == [0, 2, 3, 5]


def test_half_precision_boxes():
    boxes, scores, _, labels = clustered_boxes(4, dtype=torch.float32)
    boxes = boxes.round()  # exactly representable in float16, so both see the same boxes
    expected = batched_diou_nms(boxes, scores, labels, 0.5)
    # Computed in float32 inside, so the result is the float32 one.
    assert torch.equal(batched_diou_nms(boxes.half(), scores, labels, 0.5), expected)
    assert torch.equal(batched_diou_nms(boxes.bfloat16(), scores, labels, 0.5),
                       batched_diou_nms(boxes.bfloat16().float(), scores, labels, 0.5))


# ---- IoU-guided NMS ---------------------------------------------------------------------
@pytest.mark.parametrize("rank", ["iou", "iou_x_score"])
@pytest.mark.parametrize("seed", range(3))
def test_iou_guided_nms_equals_naive_loop(seed, rank):
    boxes, scores, ious, labels = clustered_boxes(seed)
    keep, new_scores = iou_guided_nms(boxes, scores, ious, 0.5, rank)
    expected_keep, expected_scores = naive_iou_guided_nms(boxes, scores, ious, None, 0.5, rank)
    assert keep.dtype == torch.int64 and new_scores.dtype == scores.dtype
    assert torch.equal(keep, expected_keep)
    assert torch.equal(new_scores, expected_scores)
    assert (new_scores >= scores[keep]).all() and (new_scores.diff() <= 0).all()

    keep, new_scores = batched_iou_guided_nms(boxes, scores, ious, labels, 0.5, rank)
    expected_keep, expected_scores = naive_iou_guided_nms(boxes, scores, ious, labels, 0.5, rank)
    assert torch.equal(keep, expected_keep)
    assert torch.equal(new_scores, expected_scores)


def test_iou_guided_keeps_best_localized_box_with_cluster_max_score():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],    # best score, poorly localized
                          [1.0, 0.0, 11.0, 10.0],    # best predicted IoU
                          [0.0, 1.0, 10.0, 11.0],
                          [50.0, 50.0, 60.0, 60.0]])  # a separate object
    scores = torch.tensor([0.9, 0.5, 0.6, 0.3])
    ious = torch.tensor([0.6, 0.95, 0.7, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [0, 3]  # by score, box 0 wins
    keep, new_scores = iou_guided_nms(boxes, scores, ious, 0.5, rank="iou")
    assert keep.tolist() == [1, 3]  # by IoU, box 1 wins ...
    torch.testing.assert_close(new_scores, torch.tensor([0.9, 0.3]))  # ... with the cluster's max
    # By IoU x score: 0.54, 0.475, 0.42 -> box 0 leads the cluster.
    keep, new_scores = iou_guided_nms(boxes, scores, ious, 0.5, rank="iou_x_score")
    assert keep.tolist() == [0, 3]
    torch.testing.assert_close(new_scores, torch.tensor([0.9, 0.3]))


def test_iou_guided_rejects_unknown_rank():
    boxes, scores, ious, _ = clustered_boxes(0, num_boxes=5)
    with pytest.raises(ValueError, match="rank"):
        iou_guided_nms(boxes, scores, ious, rank="score")


# ---- empty inputs -----------------------------------------------------------------------
def test_empty_inputs():
    boxes, scores = torch.zeros(0, 4), torch.zeros(0)
    labels = torch.zeros(0, dtype=torch.int64)
    for keep in (diou_nms(boxes, scores, 0.5), batched_diou_nms(boxes, scores, labels, 0.5)):
        assert keep.shape == (0,) and keep.dtype == torch.int64
    for keep, new_scores in (iou_guided_nms(boxes, scores, scores),
                             batched_iou_guided_nms(boxes, scores, scores, labels)):
        assert keep.shape == (0,) and keep.dtype == torch.int64
        assert new_scores.shape == (0,) and new_scores.dtype == scores.dtype


def test_single_box():
    boxes, scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0.5])
    assert diou_nms(boxes, scores, 0.5).tolist() == [0]
    keep, new_scores = batched_iou_guided_nms(boxes, scores, scores, torch.tensor([3]))
    assert keep.tolist() == [0] and new_scores.tolist() == [0.5]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_under_autocast_match_float32(dtype):
    """Boxes, scores and IoUs in a half type (autocast outputs) are compared in float32: the
    result is the float32 one on the same rounded values, inside or outside autocast."""
    boxes, scores, ious, labels = clustered_boxes(3, dtype=torch.float32)
    half = [t.to(dtype) for t in (boxes, scores, ious)]
    rounded = [t.float() for t in half]
    want_diou = batched_diou_nms(rounded[0], rounded[1], labels, 0.5)
    want_keep, want_scores = batched_iou_guided_nms(*rounded, labels, 0.5, rank="iou_x_score")
    with torch.autocast("cpu", dtype=dtype):
        got_diou = batched_diou_nms(half[0], half[1], labels, 0.5)
        got_keep, got_scores = batched_iou_guided_nms(*half, labels, 0.5, rank="iou_x_score")
    assert torch.equal(got_diou, want_diou)
    assert torch.equal(got_keep, want_keep)
    torch.testing.assert_close(got_scores.float(), want_scores, rtol=0, atol=0)
