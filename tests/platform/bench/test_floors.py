"""`ioulab bench latency`'s floors and operator counts on a small untrained IoUNet."""
import copy

import torch

from ioulab.detector import config as C
from ioulab.detector.model import build_model, configure_inference
from ioulab.platform.bench.floors import Recorder, count_ops, nms_floor, refine_floor

TINY = ["model.min_size=96", "model.max_size=96", "model.backbone.tiny_widths=[8,16,16,16]",
        "model.backbone.fpn_channels=16", "model.roi_heads.representation_size=32",
        "model.iou_head.representation_size=32", "model.iou_head.roi_generator.table_cap=500",
        "inference.score_thresh=0.0", "inference.mode=refine", "inference.refine.omega1=0.0"]


def test_floors_and_operator_counts():
    torch.manual_seed(0)
    cfg = C.load_config("cpu_tiny_iounet", TINY)
    model = build_model(cfg.model, 3, cfg.inference).eval()
    torch.nn.init.normal_(model.roi_heads.iou_predictor.head.out.weight, std=0.3)
    configure_inference(model, cfg.inference)
    heads = model.roi_heads
    post = heads.postprocess
    heads.postprocess = recorder = Recorder(post)
    with torch.no_grad():
        detections = model([torch.rand(3, 96, 96)])
        candidates, features, shapes = recorder.inputs
        kept = post.nms.keep(heads, candidates, features, shapes)
        trace = []
        post.refine(heads, kept, features, shapes, trace)
        assert len(detections[0]["boxes"]) and len(trace) == 1 + cfg.inference.refine.steps
        assert 0 < nms_floor(heads, candidates, features, shapes, post.nms, "cpu") < 10
        assert 0 < refine_floor(heads, features, shapes, kept, trace, "cpu") < 10
        counts = {}
        for impl in ["autograd", "direct"]:
            variant = copy.copy(post)
            variant.impl = impl
            counts[impl] = count_ops(lambda: variant.refine(heads, kept, features, shapes))
    # the target: at most half the operators of the autograd reference
    assert 0 < counts["direct"] <= counts["autograd"] / 2, counts
