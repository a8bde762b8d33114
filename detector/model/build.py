"""The factory: the only code that reads the model/inference config and picks callables.

``build_model(cfg, num_classes, inference, load_pretrained)`` returns a :class:`Detector`;
``configure_inference(model, inference)`` re-applies the test-time knobs to a built model without
touching its weights (``ioulab bench latency`` times every inference mode on one model that way;
evaluations build their model from the checkpoint's config with the overrides already applied).
"""
from __future__ import annotations

import functools
from pathlib import Path

from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, batched_nms

from ioulab.detector import losses, nms
from ioulab.detector.config import BoxLossConfig, InferenceConfig, ModelConfig, mode_needs_iou_head, validate_backbone
from ioulab.detector.model.backbone import resolve_imagenet_weights, resnet_fpn, tiny_fpn_backbone
from ioulab.detector.model.detector import Detector
from ioulab.detector.model.iou_head import IOU_LOSSES, IoUHead
from ioulab.detector.model.postprocess import build_postprocess
from ioulab.detector.model.roi_generator import IoUBalancedRoIGenerator, build_table
from ioulab.detector.model.roi_heads import BoxRegressionLoss, DetectionRoIHeads, IoUPredictor

FEATURE_MAPS = ["0", "1", "2", "3"]  # P2–P5, the levels RoIs are pooled from
NUM_LEVELS = len(FEATURE_MAPS) + 1  # + "pool" (P6) for the RPN
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# Name → callable tables of the config edge: box-loss types on deltas or on decoded boxes.
BOX_LOSSES = {**losses.DELTA_LOSSES, **losses.BOX_LOSSES}


def build_box_loss(cfg: BoxLossConfig, box_coder: det_utils.BoxCoder) -> BoxRegressionLoss:
    """The box head's regression loss from ``model.roi_heads.box_loss`` (see BoxLossConfig)."""
    fn = BOX_LOSSES[cfg.type]
    if cfg.type == "smooth_l1":
        fn = functools.partial(fn, beta=cfg.smooth_l1_beta)
    if cfg.type == "ciou":
        fn = functools.partial(fn, v_grad=cfg.ciou_v_grad)
    if cfg.type in losses.DELTA_LOSSES:
        return BoxRegressionLoss(box_coder, None, delta_loss=fn)
    return BoxRegressionLoss(box_coder, fn, proposal_frame=cfg.frame == "proposal")


def pretrained_weights(cfg: ModelConfig, download: bool = True) -> Path | None:
    """The ImageNet weights file the backbone starts from (None: random initialisation).

    Commands call it right after reading the config, before any work: missing weights fail there
    with one line naming both ways to provide them (see :func:`resolve_imagenet_weights`)."""
    b = validate_backbone(cfg.backbone, "model config")
    if not b.pretrained:
        return None
    return resolve_imagenet_weights(b.name, b.weights, download=download)


def build_backbone(cfg: ModelConfig, load_pretrained: bool = True):
    """``load_pretrained=False`` skips the ImageNet weights (a checkpoint replaces them anyway)."""
    b = cfg.backbone
    if b.name == "tiny":
        return tiny_fpn_backbone(b.tiny_widths, b.fpn_channels, b.norm)
    weights = pretrained_weights(cfg) if load_pretrained else None
    return resnet_fpn(b.name, weights, b.norm, b.trainable_layers, b.fpn_channels)


def build_pooler(cfg: ModelConfig, kind: str | None = None):
    if (kind or cfg.roi_pool) == "prroi_pool":
        from ioulab.detector.ops.poolers import MultiScalePrRoIPool  # builds the C++ op on first use

        return MultiScalePrRoIPool(FEATURE_MAPS, cfg.pool_size)
    return MultiScaleRoIAlign(FEATURE_MAPS, cfg.pool_size, sampling_ratio=2)


def build_rpn(cfg: ModelConfig, channels: int) -> RegionProposalNetwork:
    if len(cfg.anchors.sizes) != NUM_LEVELS:
        raise ValueError(f"model.anchors.sizes needs {NUM_LEVELS} sizes (one per FPN level), "
                         f"got {cfg.anchors.sizes}")
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchors.sizes),
                              (tuple(cfg.anchors.aspect_ratios),) * NUM_LEVELS)
    r = cfg.rpn
    return RegionProposalNetwork(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=r.fg_iou_thresh, bg_iou_thresh=r.bg_iou_thresh,
        batch_size_per_image=r.batch_size_per_image, positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_thresh,
    )


def build_detection_nms(cfg: InferenceConfig):
    """(boxes, scores, labels) -> keep, per class, for the detection head only."""
    if cfg.nms.type == "diou":
        return functools.partial(nms.batched_diou_nms, iou_threshold=cfg.nms.iou_threshold, beta=cfg.nms.beta)
    return functools.partial(batched_nms, iou_threshold=cfg.nms.iou_threshold)


@functools.lru_cache(maxsize=4)
def _jitter_table(cap: int, seed: int, balance: str):
    return build_table(cap, seed, balance)  # a few seconds: computed once per process


def build_iou_predictor(cfg: ModelConfig, channels: int, num_classes: int) -> IoUPredictor:
    """IoUNet's branch. Always PrRoIPool: refinement needs gradients w.r.t. box coordinates."""
    h, g = cfg.iou_head, cfg.iou_head.roi_generator
    generator = IoUBalancedRoIGenerator(
        _jitter_table(g.table_cap, g.seed, g.balance),
        per_bin_per_gt=g.per_iou if g.strategy == "per_iou" else None,
        per_img=g.per_img if g.strategy == "per_img" else None, max_per_img=g.max_per_img,
        balance=g.balance)
    return IoUPredictor(build_pooler(cfg, "prroi_pool"),
                        IoUHead(channels, cfg.pool_size, h.representation_size, num_classes, h.init),
                        IOU_LOSSES[h.loss], generator)


def require_iou_head(mode: str, has_iou_head: bool) -> None:
    """Raise if inference ``mode`` cannot run on heads without an IoU head (the rule itself:
    ``config.mode_needs_iou_head``; validated configs never get here)."""
    if mode_needs_iou_head(mode) and not has_iou_head:
        raise ValueError(f"inference.mode={mode} needs a model with an IoU head (model.iou_head.enabled=true)")


def build_roi_heads(cfg: ModelConfig, channels: int, num_classes: int,
                    inference: InferenceConfig) -> DetectionRoIHeads:
    h = cfg.roi_heads
    box_coder = det_utils.BoxCoder(tuple(h.bbox_reg_weights))
    box_loss = build_box_loss(h.box_loss, box_coder)
    heads = DetectionRoIHeads(
        build_pooler(cfg),
        TwoMLPHead(channels * cfg.pool_size**2, h.representation_size),
        FastRCNNPredictor(h.representation_size, num_classes + 1),
        fg_iou_thresh=h.fg_iou_thresh, bg_iou_thresh=h.bg_iou_thresh,
        batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction,
        bbox_reg_weights=tuple(h.bbox_reg_weights),
        score_thresh=inference.score_thresh, nms_thresh=inference.nms.iou_threshold,
        detections_per_img=inference.detections_per_img,
        box_loss=box_loss, nms=build_detection_nms(inference),
        postprocess=build_postprocess(inference) if cfg.iou_head.enabled else None,
        iou_predictor=build_iou_predictor(cfg, channels, num_classes) if cfg.iou_head.enabled else None,
    )
    return heads


def loss_weights(cfg: ModelConfig) -> dict[str, float]:
    return {
        "loss_objectness": 1.0,
        "loss_rpn_box_reg": 1.0,
        "loss_classifier": 1.0,
        "loss_box_reg": cfg.roi_heads.box_loss.weight,
        **({"loss_iou": cfg.iou_head.loss_weight} if cfg.iou_head.enabled else {}),
    }


def build_model(cfg: ModelConfig, num_classes: int, inference: InferenceConfig | None = None,
                load_pretrained: bool = True) -> Detector:
    """Faster R-CNN for ``num_classes`` foreground classes (background is added).
    ``load_pretrained=False``: no ImageNet weights (for a model whose checkpoint is loaded next)."""
    inference = inference or InferenceConfig()
    require_iou_head(inference.mode, cfg.iou_head.enabled)
    backbone = build_backbone(cfg, load_pretrained)
    channels = backbone.out_channels
    transform = GeneralizedRCNNTransform(cfg.min_size, cfg.max_size, IMAGE_MEAN, IMAGE_STD)
    return Detector(backbone, build_rpn(cfg, channels),
                    build_roi_heads(cfg, channels, num_classes, inference), transform, loss_weights(cfg))


def configure_inference(model: Detector, inference: InferenceConfig) -> Detector:
    """Apply the test-time knobs (score threshold, detections per image, NMS, inference mode) to a
    built model. ``heads.nms`` carries the NMS threshold (torchvision's ``nms_thresh`` is unused:
    ``postprocess_detections`` is ours)."""
    heads = model.roi_heads
    heads.score_thresh = inference.score_thresh
    heads.detections_per_img = inference.detections_per_img
    heads.nms = build_detection_nms(inference)
    require_iou_head(inference.mode, heads.iou_predictor is not None)
    heads.postprocess = build_postprocess(inference) if heads.iou_predictor is not None else None
    return model
