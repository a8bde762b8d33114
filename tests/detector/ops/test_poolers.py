"""MultiScalePrRoIPool: same scales and level mapping as torchvision's MultiScaleRoIAlign, and
gradients that reach the boxes."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign

from ioulab.detector.ops import MultiScalePrRoIPool

NAMES = ["p2", "p3", "p4", "p5"]
IMAGE = 512


def _features(channels=3, dtype=torch.float32, constant=False, seed=0):
    """FPN-like maps at strides 4..32 for a 512 x 512 image (plus an unused 'pool' level)."""
    gen = torch.Generator().manual_seed(seed)
    maps = OrderedDict()
    for level, name in enumerate(NAMES):
        size = IMAGE // 2 ** (level + 2)
        if constant:  # every pixel of level l holds l + 1: the output tells the level used
            maps[name] = torch.full((2, channels, size, size), float(level + 1), dtype=dtype)
        else:
            maps[name] = torch.randn(2, channels, size, size, generator=gen, dtype=dtype)
    maps["pool"] = torch.randn(2, channels, 4, 4, generator=gen, dtype=dtype)
    return maps


def _boxes(dtype=torch.float32, seed=1):
    """Two images, 9 and 6 boxes inside [16, 480]; the fixed boxes hit each FPN level (sqrt(area)
    < 112, [112, 224), [224, 448), >= 448 px), the others have random sizes."""
    gen = torch.Generator().manual_seed(seed)
    fixed = torch.tensor([[20.0, 30.0, 40.0, 52.0], [100.0, 60.0, 260.0, 200.0],
                          [50.0, 40.0, 350.0, 330.0], [18.0, 17.0, 478.0, 479.0]], dtype=dtype)
    out = []
    for count in (5, 6):
        side = torch.exp(torch.empty(count).uniform_(2.1, 6.0, generator=gen)).to(dtype)
        x1 = 16 + torch.rand(count, generator=gen, dtype=dtype) * (460 - side).clamp(min=0)
        y1 = 16 + torch.rand(count, generator=gen, dtype=dtype) * (460 - side).clamp(min=0)
        out.append(torch.stack([x1, y1, x1 + side, y1 + side], 1))
    out[0] = torch.cat([fixed, out[0]])
    return out


def test_scales_and_level_mapping_equal_multiscale_roi_align():
    features, boxes, shapes = _features(), _boxes(), [(IMAGE, IMAGE)] * 2
    ours, theirs = MultiScalePrRoIPool(NAMES, 7), MultiScaleRoIAlign(NAMES, 7, sampling_ratio=2)
    out_ours, out_theirs = ours(features, boxes, shapes), theirs(features, boxes, shapes)
    assert out_ours.shape == out_theirs.shape == (15, 3, 7, 7)
    assert ours.scales == theirs.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    levels = ours.map_levels(boxes)
    assert torch.equal(levels, theirs.map_levels(boxes))
    assert set(levels.tolist()) == {0, 1, 2, 3}


def test_each_box_pooled_from_the_same_level_as_roi_align():
    # Constant maps: inside the map both poolers return the level's constant, so equal outputs
    # mean the same level was used for every box, in the same order.
    features, boxes, shapes = _features(constant=True), _boxes(), [(IMAGE, IMAGE)] * 2
    out_ours = MultiScalePrRoIPool(NAMES, 7)(features, boxes, shapes)
    out_theirs = MultiScaleRoIAlign(NAMES, 7, sampling_ratio=2)(features, boxes, shapes)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=0)
    assert len(torch.unique(out_ours.round())) == 4


def test_gradient_reaches_boxes_and_matches_reference_backend():
    features = _features(dtype=torch.float64, seed=3)
    shapes = [(IMAGE, IMAGE)] * 2
    weights = torch.randn(15, 3, 7, 7, dtype=torch.float64)
    grads = {}
    for backend in ("extension", "reference"):
        boxes = [b.requires_grad_() for b in _boxes(dtype=torch.float64)]
        feats = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())
        out = MultiScalePrRoIPool(NAMES, 7, backend=backend)(feats, boxes, shapes)
        (out * weights).sum().backward()
        grads[backend] = [b.grad for b in boxes] + [feats[n].grad for n in NAMES]
        for b in boxes:
            assert b.grad is not None and torch.isfinite(b.grad).all()
            assert (b.grad.abs().sum(1) > 0).all()  # every box gets a gradient
    for got, want in zip(grads["extension"], grads["reference"]):
        assert (got - want).abs().max() <= 1e-10


def test_single_level_and_image_without_boxes():
    features = OrderedDict(p2=torch.randn(2, 3, 64, 64))
    boxes = [torch.tensor([[4.0, 8.0, 60.0, 90.0]]), torch.zeros(0, 4)]
    pool = MultiScalePrRoIPool(["p2"], (3, 5))
    out = pool(features, boxes, [(256, 256), (256, 256)])
    assert out.shape == (1, 3, 3, 5)
    assert pool.scales == [0.25]
    empty = MultiScalePrRoIPool(NAMES, 7)(_features(), [torch.zeros(0, 4)] * 2, [(IMAGE, IMAGE)] * 2)
    assert empty.shape == (0, 3, 7, 7)


def test_drop_in_for_torchvision_roi_heads():
    channels, classes = 4, 3
    heads = RoIHeads(
        box_roi_pool=MultiScalePrRoIPool(NAMES, 7),
        box_head=TwoMLPHead(channels * 49, 16),
        box_predictor=FastRCNNPredictor(16, classes),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=32, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=0.0, nms_thresh=0.5, detections_per_img=10,
    ).eval()
    with torch.no_grad():
        detections, _ = heads(_features(channels), _boxes(), [(IMAGE, IMAGE)] * 2)
    assert len(detections) == 2
    assert all(d["boxes"].shape[1] == 4 and len(d["boxes"]) <= 10 for d in detections)


@pytest.mark.parametrize("output_size", [7, (7, 7)])
def test_output_size_forms(output_size):
    assert MultiScalePrRoIPool(NAMES, output_size).output_size == (7, 7)
