"""RoI heads: torchvision's Fast R-CNN head with an injectable box loss and detection NMS.

Shape glossary:
    N  images in the batch           R  RoIs (proposals) over the batch, Ri per image
    K  classes including background  P  positive (foreground) RoIs
    D  detections per image

Why a subclass: torchvision's ``RoIHeads.forward`` hard-wires Smooth-L1 in ``fastrcnn_loss`` and
``batched_nms`` in ``postprocess_detections``. We keep its proposal matching and sampling
(``select_training_samples``) and replace the two pieces with callables chosen by the factory.

Mixed precision: under ``torch.autocast`` the box head's outputs (class logits, box deltas) are
cast to float32 as they leave it (:meth:`DetectionRoIHeads._predict`), so softmax, box decoding,
the box losses and NMS run in float32: decoded in bfloat16, an 800 px coordinate would be rounded
to a multiple of 4 px. (The RPN's proposals are decoded by torchvision in the autocast dtype;
they are only the box head's inputs, and its deltas are relative to them.)
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from ioulab.detector.losses import at_least_float32, paired_iou, smooth_l1_delta_loss
from ioulab.detector.model.iou_head import IoUHead, IoULoss, select_class
from ioulab.detector.model.roi_generator import IoUBalancedRoIGenerator

# (boxes Tensor[M, 4], scores Tensor[M], labels Tensor[M]) -> keep Tensor[M'] sorted by score
DetectionNMS = Callable[[Tensor, Tensor, Tensor], Tensor]
# (pred Tensor[P, 4], target Tensor[P, 4], reduction) -> loss ; xyxy boxes
PairLoss = Callable[..., Tensor]
# (pred deltas Tensor[P, 4], target deltas Tensor[P, 4], reduction) -> loss ; encoded deltas
DeltaLoss = Callable[..., Tensor]


class BoxRegressionLoss:
    """Box-head regression loss over positive RoIs, normalised by the number of sampled RoIs.

    ``iou_loss=None`` compares the encoded deltas with ``delta_loss`` (default: Fast R-CNN's
    Smooth-L1 with ``smooth_l1_beta``; or e.g. L1, the IoUNet reproduction's baseline). Otherwise
    both the predicted
    deltas and the targets are decoded to boxes and ``iou_loss`` compares them, in the image frame
    (against the proposals) or, with ``proposal_frame=True``, against a unit box as the DIoU code
    does (there, distances are measured relative to the proposal's width and height).
    """

    def __init__(self, box_coder: det_utils.BoxCoder, iou_loss: PairLoss | None,
                 proposal_frame: bool = False, smooth_l1_beta: float = 1.0 / 9.0,
                 delta_loss: DeltaLoss | None = None):
        self.box_coder = box_coder
        self.iou_loss = iou_loss
        self.proposal_frame = proposal_frame
        self.delta_loss = delta_loss or partial(smooth_l1_delta_loss, beta=smooth_l1_beta)

    def __call__(self, box_regression: Tensor, labels: Tensor, regression_targets: Tensor,
                 proposals: Tensor) -> tuple[Tensor, Tensor]:
        """box_regression Tensor[R, K*4], labels Tensor[R], regression_targets Tensor[R, 4],
        proposals Tensor[R, 4] → (loss scalar, mean IoU of the decoded positives, detached)."""
        pos = torch.where(labels > 0)[0]
        deltas = box_regression.reshape(box_regression.shape[0], -1, 4)[pos, labels[pos]]  # [P, 4]
        targets = regression_targets[pos]
        num_sampled = max(labels.numel(), 1)
        with torch.no_grad():
            ref = proposals[pos]
            mean_iou = paired_iou(self.box_coder.decode_single(deltas, ref),
                                  self.box_coder.decode_single(targets, ref)).mean() if pos.numel() \
                else deltas.new_zeros(())
        if self.iou_loss is None:
            return self.delta_loss(deltas, targets, reduction="sum") / num_sampled, mean_iou
        ref = proposals[pos]
        if self.proposal_frame:
            ref = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=deltas.dtype, device=deltas.device).expand_as(ref)
        pred_boxes = self.box_coder.decode_single(deltas, ref)
        target_boxes = self.box_coder.decode_single(targets, ref)
        return self.iou_loss(pred_boxes, target_boxes, reduction="sum") / num_sampled, mean_iou


class IoUPredictor(torch.nn.Module):
    """IoUNet's branch: PrRoIPool on the FPN maps → :class:`IoUHead` → IoU of each box for its
    class. Trained on IoU-balanced jittered RoIs (``generator``), not on proposals."""

    def __init__(self, pooler: torch.nn.Module, head: IoUHead, loss: IoULoss,
                 generator: IoUBalancedRoIGenerator):
        super().__init__()
        self.pooler = pooler
        self.head = head
        self.loss = loss
        self.generator = generator

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], labels: Tensor,
                image_shapes: list[tuple[int, int]]) -> Tensor:
        """boxes: per image Tensor[Ri, 4]; labels Tensor[R] (1..K) → decoded IoU Tensor[R]."""
        return self.loss.decode(self._raw(features, boxes, labels, image_shapes))

    def _raw(self, features, boxes, labels, image_shapes) -> Tensor:
        return select_class(self.head(self.pooler(features, boxes, image_shapes)), labels)

    def training_loss(self, features, targets, image_shapes) -> tuple[Tensor, Tensor]:
        """(IoU loss averaged over the generated RoIs, their mean target IoU)."""
        rois, ious, labels = zip(*(self.generator(t["boxes"], t["labels"], shape)
                                   for t, shape in zip(targets, image_shapes)))
        target = torch.cat(ious)
        raw = self._raw(features, list(rois), torch.cat(labels), image_shapes)
        return self.loss(raw, target), target.mean() if target.numel() else target.new_zeros(())


class DetectionRoIHeads(RoIHeads):
    """Fast R-CNN head: proposals → pooled features → (class logits, box deltas) → losses or
    detections; optionally IoUNet's IoU branch. ``box_loss``, ``nms`` and ``postprocess`` are
    callables chosen by the factory (see :class:`BoxRegressionLoss`, ``postprocess.py``)."""

    def __init__(self, *args, box_loss: BoxRegressionLoss, nms: DetectionNMS,
                 postprocess: Callable | None = None, iou_predictor: IoUPredictor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss = box_loss
        self.nms = nms
        self.postprocess = postprocess
        self.iou_predictor = iou_predictor

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]], targets: list[dict[str, Tensor]] | None = None):
        """features: FPN maps; proposals: list of Tensor[Ri, 4] per image.
        Training → ([], losses); inference → (list of {boxes [D,4], scores [D], labels [D]}, {})."""
        if self.training:
            losses = self._forward_box_train(features, proposals, image_shapes, targets)
            if self.iou_predictor is not None:
                losses["loss_iou"], losses["iou_target_mean"] = self.iou_predictor.training_loss(
                    features, targets, image_shapes)
            return [], losses
        return self._forward_box_infer(features, proposals, image_shapes), {}

    def _predict(self, features, proposals, image_shapes) -> tuple[Tensor, Tensor]:
        """(class_logits Tensor[R, K], box_regression Tensor[R, K*4]), at least float32."""
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        return at_least_float32(class_logits), at_least_float32(box_regression)

    def _forward_box_train(self, features, proposals, image_shapes, targets) -> dict[str, Tensor]:
        if targets is None:
            raise ValueError("targets are required in training mode")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self._predict(features, proposals, image_shapes)
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        loss_box, mean_iou = self.box_loss(box_regression, labels, regression_targets, torch.cat(proposals))
        return {
            "loss_classifier": F.cross_entropy(class_logits, labels),
            "loss_box_reg": loss_box,
            "box_iou_pos": mean_iou,  # a statistic, not a loss: the trainer logs it, never sums it
        }

    def _forward_box_infer(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        class_logits, box_regression = self._predict(features, proposals, image_shapes)
        if self.postprocess is None:  # plain Faster R-CNN
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
            return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]
        candidates = self.candidates(class_logits, box_regression, proposals, image_shapes,
                                     self.postprocess.candidate_boxes)
        return self.postprocess(self, candidates, features, image_shapes)

    def candidates(self, class_logits: Tensor, box_regression: Tensor, proposals: list[Tensor],
                   image_shapes: list[tuple[int, int]], boxes_from: str = "per_class"
                   ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per image, the class-specific boxes before NMS: decoded, clipped, without background,
        low scores and tiny boxes → list of (boxes Tensor[M, 4], scores Tensor[M], labels Tensor[M]).
        ``boxes_from``: per_class (class c's box is decoded with class c's deltas) | argmax (every
        class's box is the proposal decoded with the deltas of its highest-scoring foreground class)."""
        num_classes = class_logits.shape[-1]
        counts = [p.shape[0] for p in proposals]
        all_boxes = self.box_coder.decode(box_regression, proposals).split(counts)
        all_scores = F.softmax(class_logits, -1).split(counts)
        out = []
        for boxes, scores, shape in zip(all_boxes, all_scores, image_shapes):
            if boxes_from == "argmax":  # boxes Tensor[N, K, 4] → the best class's box, K times
                best = boxes[torch.arange(len(boxes)), scores[:, 1:].argmax(1) + 1]
                boxes = best.unsqueeze(1).expand_as(boxes)
            boxes = box_ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)  # drop background
            labels = torch.arange(1, num_classes, device=boxes.device).expand(scores.shape[0], -1).reshape(-1)
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            out.append((boxes[keep], scores[keep], labels[keep]))
        return out

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor,
                               proposals: list[Tensor], image_shapes: list[tuple[int, int]]):
        """torchvision's contract: lists (per image) of boxes Tensor[D, 4], scores Tensor[D],
        labels Tensor[D] after ``self.nms`` per class and the ``detections_per_img`` best."""
        detections = self.nms_detections(self.candidates(class_logits, box_regression, proposals, image_shapes))
        return ([d["boxes"] for d in detections], [d["scores"] for d in detections],
                [d["labels"] for d in detections])

    def nms_detections(self, candidates: list[tuple[Tensor, Tensor, Tensor]]) -> list[dict[str, Tensor]]:
        """Per image, ``self.nms`` per class on the candidates (boxes Tensor[M, 4], scores Tensor[M],
        labels Tensor[M]) and the ``detections_per_img`` best → {boxes [D,4], scores [D], labels [D]}."""
        out = []
        for boxes, scores, labels in candidates:
            keep = self.nms(boxes, scores, labels)[: self.detections_per_img]
            out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return out
