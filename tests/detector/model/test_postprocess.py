"""Inference modes' candidates: ``inference.iou_nms.boxes`` (per_class | argmax)."""
import torch

from ioulab.detector import config as C
from ioulab.detector.model import build_model, configure_inference
from ioulab.detector.model.postprocess import build_postprocess

from tests.detector.model.test_iounet import TINY


def _heads(*overrides):
    cfg = C.load_config("cpu_tiny_iounet", TINY + ["inference.score_thresh=0.0", *overrides])
    return build_model(cfg.model, 3, cfg.inference).eval(), cfg


def _head_outputs():
    """3 proposals, 3 foreground classes (+ background at column 0), distinct deltas per class."""
    torch.manual_seed(0)
    proposals = [torch.tensor([[10.0, 10.0, 40.0, 50.0], [20.0, 30.0, 60.0, 70.0], [5.0, 5.0, 25.0, 20.0]])]
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [0.0, 2.5, 0.5, 1.0], [0.0, 0.0, 0.0, 4.0]])
    regression = torch.randn(3, 4 * 4) * 0.3
    return logits, regression, proposals, [(96, 96)]


def test_argmax_uses_the_best_class_box_for_every_class():
    model, _ = _heads()
    heads = model.roi_heads
    logits, regression, proposals, shapes = _head_outputs()
    (pb, ps, pl), = heads.candidates(logits, regression, proposals, shapes, "per_class")
    (ab, as_, al), = heads.candidates(logits, regression, proposals, shapes, "argmax")
    assert torch.equal(ps, as_) and torch.equal(pl, al)  # scores and labels do not change
    boxes = ab.view(3, 3, 4)  # proposal-major, classes 1..3
    assert bool((boxes == boxes[:, :1]).all())  # one box per proposal for every class
    best = logits[:, 1:].argmax(1)  # classes 2, 1, 3
    per_class = pb.view(3, 3, 4)
    assert torch.equal(boxes[:, 0], per_class[torch.arange(3), best])  # the best class's own box
    assert not torch.equal(ab, pb)


def test_boxes_option_reaches_only_the_iou_nms_modes(batch):
    for mode, follows in [("baseline", False), ("iou_regular_nms", False), ("iou_nms", True), ("refine", True)]:
        inference = C.InferenceConfig(mode=mode)
        inference.iou_nms.boxes = "argmax"
        post = build_postprocess(inference)
        assert post.candidate_boxes == ("argmax" if follows else "per_class"), mode
    model, cfg = _heads("inference.mode=iou_nms")
    images, _ = batch
    with torch.no_grad():
        per_class = model(images)
        configure_inference(model, C.apply_overrides(C.clone(cfg), ["inference.iou_nms.boxes=argmax"]).inference)
        argmax = model(images)
        configure_inference(model, C.apply_overrides(C.clone(cfg), ["inference.iou_nms.boxes=argmax",
                                                                    "inference.mode=baseline"]).inference)
        baseline_argmax = model(images)
        configure_inference(model, C.apply_overrides(C.clone(cfg), ["inference.mode=baseline"]).inference)
        baseline = model(images)
    for a, b in zip(baseline, baseline_argmax):  # baseline ignores the option
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert any(not torch.equal(a["boxes"], b["boxes"]) for a, b in zip(per_class, argmax))
    for det in argmax:
        b = det["boxes"]
        assert bool((b[:, 2] > b[:, 0]).all() and (b >= 0).all() and (b <= 96).all())
