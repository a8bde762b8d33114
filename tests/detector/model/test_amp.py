"""The IoUNet model under torch.autocast on CPU (the code path CUDA AMP runs): half-type features,
float32 box-head outputs, IoU predictions and refinement gradients, every inference mode."""
import math

import pytest
import torch

from ioulab.detector import config as C
from ioulab.detector.model import build_model, configure_inference
from ioulab.detector.model.iou_head import IoUHead
from ioulab.detector.model.refine import refine_boxes
from ioulab.detector.ops import prroi_pool

TINY = ["model.min_size=96", "model.max_size=96", "model.backbone.tiny_widths=[8,16,16,16]",
        "model.backbone.fpn_channels=16", "model.roi_heads.representation_size=32",
        "model.roi_heads.batch_size_per_image=32", "model.iou_head.representation_size=32",
        "model.iou_head.roi_generator.per_img=40", "model.iou_head.roi_generator.table_cap=500"]
MODES = ["baseline", "iou_regular_nms", "iou_nms", "refine"]


def test_iou_head_output_layer_runs_in_float32():
    torch.manual_seed(0)
    head = IoUHead(4, 2, 16, 3)
    pooled = torch.randn(5, 4, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = head(pooled)
        hidden = head.fc1(pooled.flatten(1))
    assert hidden.dtype == torch.bfloat16  # the rest of the head does use autocast
    assert raw.dtype == torch.float32
    # Only the hidden layers' bfloat16 rounding separates it from the float32 head.
    torch.testing.assert_close(raw, head(pooled), rtol=0.05, atol=1e-3)


def test_refinement_keeps_float32_boxes_and_gradients():
    """f computes in bfloat16 (features, pooling) like the IoU head under autocast; the boxes,
    their gradient and the predicted IoU stay float32, and the steps still move the boxes."""
    torch.manual_seed(0)
    feature = torch.randn(1, 2, 16, 16).bfloat16()
    seen = []

    def f(boxes, index):
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1)
        pooled = prroi_pool(feature, rois, 2, 0.25)
        seen.append((pooled.dtype, rois.dtype))
        return pooled.mean((1, 2, 3))  # bfloat16, differentiable in the boxes

    boxes = torch.tensor([[8.0, 8.0, 30.0, 40.0], [20.0, 4.0, 50.0, 20.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        refined, iou = refine_boxes(boxes, f, torch.tensor([[64.0, 64.0]] * 2), lam=0.5, steps=3,
                                    omega1=0.0, omega2=-1.0)
    assert seen[0] == (torch.bfloat16, torch.float32)
    assert refined.dtype == torch.float32 and iou.dtype == torch.float32
    assert not torch.equal(refined, boxes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_step_and_every_mode_under_autocast(batch, dtype):
    cfg = C.load_config("cpu_tiny_iounet", TINY + ["inference.score_thresh=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 3, cfg.inference)
    images, targets = batch
    pooled_dtypes = []
    model.roi_heads.iou_predictor.pooler.register_forward_hook(
        lambda module, args, out: pooled_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=dtype):
        terms = model(images, targets)
    assert pooled_dtypes == [dtype]  # PrRoIPool ran on half-type features
    assert terms["loss_box_reg"].dtype == torch.float32 and terms["loss_iou"].dtype == torch.float32
    assert all(math.isfinite(v.item()) for v in terms.values())
    sum(model.weighted_losses(terms).values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    for mode in MODES:
        inf = C.apply_overrides(C.clone(cfg), [f"inference.mode={mode}", "inference.refine.steps=2"]).inference
        configure_inference(model, inf)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            detections = model(images)
        for det in detections:
            assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32, mode
            assert len(det["boxes"]) > 0 and torch.isfinite(det["boxes"]).all(), mode
            assert bool((det["scores"][:-1] >= det["scores"][1:]).all()), mode
