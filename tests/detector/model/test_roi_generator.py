import pytest
import torch
from torchvision.ops import box_iou

from ioulab.detector.model.roi_generator import (BIN_EDGES, SUB_BINS, IoUBalancedRoIGenerator, apply_jitters,
                                                 build_table, grid_jitters, jitter_iou)


@pytest.fixture(scope="module")
def table():
    return build_table(cap=500, seed=0)


def test_jitter_iou_matches_box_iou():
    j = grid_jitters()[::997]
    gt = torch.tensor([[10.0, 20.0, 110.0, 70.0]], dtype=torch.float64).expand(len(j), 4)
    boxes = apply_jitters(gt, j)
    expected = box_iou(boxes, gt[:1]).squeeze(1)
    assert torch.allclose(jitter_iou(j), expected, atol=1e-12)


def test_reference_grid_starves_the_top_bin():
    iou = jitter_iou(grid_jitters())
    counts = [int(((iou >= lo) & (iou < hi)).sum()) for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:])]
    assert len(grid_jitters()) == 31 * 31 * 16 * 16
    assert counts[-1] * 10 < counts[0]  # the flaw our table fixes


def test_table_bins_hold_what_they_claim_and_are_balanced(table):
    assert len(table) == 5
    for (lo, hi), jit in zip(zip(BIN_EDGES[:-1], BIN_EDGES[1:]), table):
        assert jit.shape == (500, 4)
        iou = jitter_iou(jit.double())
        assert bool(((iou >= lo - 1e-6) & (iou < hi)).all()), (lo, iou.min(), iou.max())
        sub = torch.histc(iou, bins=SUB_BINS, min=lo, max=hi)
        assert sub.tolist() == [500 / SUB_BINS] * SUB_BINS  # uniform inside the bin too
        assert len(torch.unique(jit, dim=0)) == 500


def test_table_is_deterministic(table):
    again = build_table(cap=500, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(table, again))


def _gts():
    return torch.tensor([[100.0, 100.0, 180.0, 160.0], [300.0, 200.0, 340.0, 290.0]]), torch.tensor([2, 5])


def test_per_iou_strategy_is_balanced(table):
    torch.manual_seed(0)
    boxes, labels = _gts()
    gen = IoUBalancedRoIGenerator(table, per_bin_per_gt=30, max_per_img=1000)
    rois, ious, out_labels = gen(boxes, labels, (512, 512))
    assert rois.shape == (2 * 5 * 30, 4)  # boxes far from the border: nothing clipped away
    assert torch.allclose(ious, box_iou(rois, boxes).max(1).values)
    assert torch.histc(ious, bins=5, min=0.5, max=1.0).tolist() == [60.0] * 5
    assert sorted(out_labels.unique().tolist()) == [2, 5]
    # capped per image: N is reduced evenly
    capped = IoUBalancedRoIGenerator(table, per_bin_per_gt=30, max_per_img=100)
    assert capped(boxes, labels, (512, 512))[0].shape[0] == 100


def test_per_img_strategy_spreads_over_bins_and_gts(table):
    torch.manual_seed(0)
    boxes, labels = _gts()
    gen = IoUBalancedRoIGenerator(table, per_img=103)
    counts = gen.counts(2)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    rois, ious, _ = gen(boxes, labels, (512, 512))
    assert len(rois) == 103 and bool((ious >= 0.5).all())


def test_clipping_and_no_gt(table):
    gen = IoUBalancedRoIGenerator(table, per_img=50)
    rois, ious, labels = gen(torch.tensor([[0.0, 0.0, 20.0, 20.0]]), torch.tensor([1]), (20, 20))
    assert bool((rois >= 0).all() and (rois <= 20).all() and (ious >= 0.5).all())
    assert torch.allclose(ious, box_iou(rois, torch.tensor([[0.0, 0.0, 20.0, 20.0]])).squeeze(1))
    empty = gen(torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), (20, 20))
    assert [t.shape[0] for t in empty] == [0, 0, 0]
    with pytest.raises(ValueError, match="exactly one"):
        IoUBalancedRoIGenerator(table, per_bin_per_gt=3, per_img=3)
