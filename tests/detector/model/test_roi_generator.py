import pytest
import torch
from torchvision.ops import box_iou

from ioulab.detector.model.roi_generator import (BIN_EDGES, SUB_BINS, IoUBalancedRoIGenerator, apply_jitters,
                                                 build_table, ioulab_grid_jitters, jitter_iou,
                                                 reference_grid_jitters)


@pytest.fixture(scope="module")
def table():
    return build_table(cap=500, seed=0)


def test_jitter_iou_matches_box_iou():
    j = ioulab_grid_jitters()[::997]
    gt = torch.tensor([[10.0, 20.0, 110.0, 70.0]], dtype=torch.float64).expand(len(j), 4)
    boxes = apply_jitters(gt, j)
    expected = box_iou(boxes, gt[:1]).squeeze(1)
    assert torch.allclose(jitter_iou(j), expected, atol=1e-12)


def _bin_counts(iou):
    return [int(((iou >= lo) & (iou < hi)).sum()) for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:])]


def test_ioulab_grid_starves_the_top_bin():
    counts = _bin_counts(jitter_iou(ioulab_grid_jitters()))
    assert len(ioulab_grid_jitters()) == 31 * 31 * 16 * 16
    assert counts[-1] * 10 < counts[0]  # the flaw our table fixes
    assert counts[0] / counts[-1] == pytest.approx(20.0, abs=0.5)  # README's "about 20x": this grid


def test_reference_grid_is_the_reproductions():
    """OpenMMLab-IoUNet's RoIGenerator(xy_steps=16, wh_steps=16, area_range=(1/3, 3), nonlinearity=2)
    bins its grid into 19170, 7010, 2372, 670 and 79 jitters (issue 15, counted on its code)."""
    grid = reference_grid_jitters()
    assert len(grid) == 31 * 31 * 16 * 16
    scales = grid[:, 2].unique()
    assert scales[0].item() == pytest.approx(3 ** -0.5) and scales[-1].item() == pytest.approx(3 ** 0.5)
    assert scales[1] - scales[0] < scales[-1] - scales[-2]  # dense at the small end, not around 1
    assert _bin_counts(jitter_iou(grid)) == [19170, 7010, 2372, 670, 79]
    assert torch.equal(grid[:, :2].unique(), ioulab_grid_jitters()[:, :2].unique())  # same offsets


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


@pytest.fixture(scope="module")
def reference_table():
    return build_table(cap=4000, seed=0, balance="reference")


def test_reference_table_caps_each_bin(reference_table):
    assert [len(t) for t in reference_table] == [4000, 4000, 2372, 670, 79]
    for (lo, hi), jit in zip(zip(BIN_EDGES[:-1], BIN_EDGES[1:]), reference_table):
        iou = jitter_iou(jit.double())
        assert bool(((iou >= lo - 1e-6) & (iou < hi + 1e-6)).all())
        assert len(torch.unique(jit, dim=0)) == len(jit)
    again = build_table(cap=4000, seed=0, balance="reference")
    assert all(torch.equal(a, b) for a, b in zip(reference_table, again))


def _rois_per_bin(ious):
    return torch.histc(ious.double(), bins=5, min=0.5, max=1.0)


def test_reference_balance_gives_the_top_bin_about_9_percent(reference_table):
    """per_img=1000: 201 distinct jitters from each of the first four bins, all 79 of the top one,
    each applied to every GT, 1000 kept: the reproduction's 79 / 883 ≈ 9% in the top bin."""
    torch.manual_seed(0)
    gen = IoUBalancedRoIGenerator(reference_table, per_img=1000, balance="reference")
    one_gt = torch.tensor([[1000.0, 1000.0, 1300.0, 1200.0]], dtype=torch.float64)
    rois, ious, _ = gen(one_gt, torch.tensor([1]), (3000, 3000))
    assert len(rois) == 4 * 201 + 79  # fewer than 1000: all kept, nothing clipped
    per_bin = _rois_per_bin(ious)
    expected = torch.tensor([201.0] * 4 + [79.0], dtype=per_bin.dtype)
    assert (per_bin - expected).abs().max() <= 2  # float32 table: a jitter at a bin edge may move
    # Several GTs: 1000 of G x 883 RoIs are kept at random, the proportions stay.
    gts = torch.tensor([[100.0 + 400 * i, 100.0, 300.0 + 400 * i, 250.0] for i in range(4)])
    top = []
    for _ in range(5):
        rois, ious, labels = gen(gts, torch.arange(1, 5), (3000, 3000))
        assert len(rois) == 1000 and labels.unique().numel() == 4
        top.append((_rois_per_bin(ious)[-1] / len(ious)).item())
    assert sum(top) / len(top) == pytest.approx(79 / 883, abs=0.01)
    uniform = IoUBalancedRoIGenerator(build_table(cap=500, seed=0), per_img=1000)
    uniform_ious = uniform(gts, torch.arange(1, 5), (3000, 3000))[1]
    assert (_rois_per_bin(uniform_ious)[-1] / 1000).item() == pytest.approx(0.2, abs=0.01)  # the default


def test_reference_balance_per_iou_uses_distinct_jitters_for_every_gt(reference_table):
    torch.manual_seed(0)
    boxes, labels = _gts()
    boxes = boxes.double()
    gen = IoUBalancedRoIGenerator(reference_table, per_bin_per_gt=30, max_per_img=1000, balance="reference")
    rois, ious, _ = gen(boxes, labels, (512, 512))
    assert len(rois) == 2 * 5 * 30
    # the same 150 jitters for both GTs: each GT's RoIs, normalised to the GT, are the same set
    def normalised(gt):
        mine = rois[box_iou(rois, boxes).argmax(1) == gt]
        w, h = boxes[gt, 2] - boxes[gt, 0], boxes[gt, 3] - boxes[gt, 1]
        return sorted(((mine - boxes[gt, :2].repeat(2)) / torch.stack([w, h, w, h])).round(decimals=6).tolist())
    assert normalised(0) == normalised(1)
    capped = IoUBalancedRoIGenerator(reference_table, per_bin_per_gt=30, max_per_img=100, balance="reference")
    assert len(capped(boxes, labels, (512, 512))[0]) == 100
