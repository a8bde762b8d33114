"""Box head losses (incl. the frames of REFERENCE.md case H) and detection NMS in the model."""
import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils

from ioulab.detector import config as C
from ioulab.detector.losses import diou_loss, iou_loss
from ioulab.detector.model import build_model, configure_inference
from ioulab.detector.model.roi_heads import BoxRegressionLoss

CODER = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))


def _case_h(loss_fn, frame):
    proposal = torch.tensor([[0.0, 0.0, 20.0, 10.0]])
    pred_box, gt_box = torch.tensor([[0.0, 0.0, 20.0, 10.0]]), torch.tensor([[4.0, 0.0, 24.0, 10.0]])
    K = 3
    deltas = torch.zeros(1, 4 * K)
    deltas[0, 8:12] = CODER.encode_single(pred_box, proposal)[0]  # class 2's slot
    targets = CODER.encode_single(gt_box, proposal)
    head_loss = BoxRegressionLoss(CODER, loss_fn, proposal_frame=frame == "proposal")
    # 1 positive out of 4 sampled RoIs: the loss is divided by all sampled RoIs.
    labels = torch.tensor([2, 0, 0, 0])
    loss, mean_iou = head_loss(deltas.repeat(4, 1), labels, targets.repeat(4, 1), proposal.repeat(4, 1))
    return loss * 4, mean_iou


def test_case_h_image_frame():
    loss, mean_iou = _case_h(diou_loss, "image")
    assert 1 - loss.item() == pytest.approx(0.642998, abs=1e-5)
    assert mean_iou.item() == pytest.approx(2 / 3, abs=1e-5)
    assert 1 - _case_h(iou_loss, "image")[0].item() == pytest.approx(2 / 3, abs=1e-5)


def test_case_h_proposal_frame():
    """Against a unit box, distances are relative to the proposal: IoU is unchanged (per-axis
    affine), DIoU's centre term becomes (0.2²)/(1.2² + 1²)."""
    loss, _ = _case_h(diou_loss, "proposal")
    assert 1 - loss.item() == pytest.approx(2 / 3 - 0.04 / 2.44, abs=1e-5)
    assert 1 - _case_h(iou_loss, "proposal")[0].item() == pytest.approx(2 / 3, abs=1e-5)


def test_smooth_l1_is_torchvision_fastrcnn_loss():
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    torch.manual_seed(0)
    R, K = 16, 4
    logits, deltas = torch.randn(R, K), torch.randn(R, 4 * K)
    labels, targets = torch.randint(0, K, (R,)), torch.randn(R, 4)
    _, expected = fastrcnn_loss(logits, deltas, [labels], [targets])
    ours, _ = BoxRegressionLoss(CODER, None)(deltas, labels, targets, torch.rand(R, 4) * 10 + torch.tensor([0, 0, 20, 20]))
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)




TINY = ["model.min_size=96", "model.max_size=96", "model.backbone.tiny_widths=[8,16,16,16]",
        "model.backbone.fpn_channels=16", "model.roi_heads.representation_size=32",
        "model.roi_heads.batch_size_per_image=32"]


@pytest.mark.parametrize("loss_type", ["smooth_l1", "l1", "iou", "giou", "diou", "ciou"])
@pytest.mark.parametrize("frame", ["image", "proposal"])
def test_each_box_loss_trains_finite(loss_type, frame, batch):
    cfg = C.load_config("cpu_tiny", TINY + [f"model.roi_heads.box_loss.type={loss_type}",
                                            f"model.roi_heads.box_loss.frame={frame}",
                                            "model.roi_heads.box_loss.weight=12"])
    model = build_model(cfg.model, 3, cfg.inference)
    opt = torch.optim.SGD(model.parameters(), lr=0.005)
    images, targets = batch
    for _ in range(3):
        terms = model(images, targets)
        loss = sum(model.weighted_losses(terms).values())
        assert all(math.isfinite(v.item()) for v in terms.values()), terms
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
    assert model.loss_weights["loss_box_reg"] == 12.0


def test_detection_nms_is_configurable_and_rpn_untouched(batch):
    cfg = C.load_config("cpu_tiny", TINY + ["inference.score_thresh=0.0"])
    model = build_model(cfg.model, 3, cfg.inference).eval()
    images, _ = batch
    with torch.no_grad():
        greedy = model(images)
        configure_inference(model, C.apply_overrides(C.clone(cfg), ["inference.nms.type=diou", "inference.nms.beta=0.9"]).inference)
        diou = model(images)
    assert model.rpn.nms_thresh == cfg.model.rpn.nms_thresh  # RPN keeps torchvision's NMS
    assert all(len(d["boxes"]) <= 100 for d in diou)
    # DIoU-NMS suppresses no more than greedy NMS at the same threshold (its criterion is ≤ IoU).
    assert all(len(d["boxes"]) >= len(g["boxes"]) for d, g in zip(diou, greedy))
