"""Inference modes of an IoUNet model: what happens to the box head's candidates.

Shape glossary: per image, M candidates (class-specific boxes above the score threshold) and
D ≤ ``detections_per_img`` detections; all images of the batch are processed together wherever the
work is batched (IoU prediction, refinement).

Each mode is a callable ``(heads, candidates, features, image_shapes) -> detections`` built from
the inference config by its class's ``from_config`` (:func:`build_postprocess` picks the class by
``inference.mode`` from :data:`MODES`); one trained checkpoint can be evaluated every way:

    NMSPost               box head + NMS, IoU head unused               ("baseline")
    IoURegularNMSPost     IoU predicted for every candidate, then NMS    ("iou_regular_nms")
    IoUNMSPost            IoU-guided NMS                                 ("iou_nms")
    RefinePost            IoU-guided NMS, then refinement, score × IoU  ("refine")
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops.poolers import _convert_to_roi_format

from ioulab.detector.config import InferenceConfig
from ioulab.detector.nms import batched_iou_guided_nms
from ioulab.detector.model.refine import refine_boxes
from ioulab.detector.model.refine_direct import DirectIoU, predict_grouped, refine_boxes_direct
from ioulab.detector.ops.poolers import LevelPool
from ioulab.detector.ops.prroi_pool import _resolve_backend

Candidates = list[tuple[Tensor, Tensor, Tensor]]  # per image (boxes [M,4], scores [M], labels [M])


def _detections(boxes: Tensor, scores: Tensor, labels: Tensor, limit: int) -> dict[str, Tensor]:
    order = scores.argsort(descending=True, stable=True)[:limit]
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


def _predict_ious(heads, candidates: Candidates, features, image_shapes) -> list[Tensor]:
    """Predicted IoU of every candidate, all images in one pass."""
    boxes = [c[0] for c in candidates]
    labels = torch.cat([c[2] for c in candidates])
    if labels.numel() == 0:
        return [c[1].new_zeros((0,)) for c in candidates]
    predictor = heads.iou_predictor
    if _resolve_backend(predictor.pooler.backend) == "reference":
        ious = predictor(features, boxes, labels, image_shapes)
    else:  # the same numbers, without gathering the pooled features back to box order
        p = predict_grouped(predictor, LevelPool(predictor.pooler, features, image_shapes),
                            _convert_to_roi_format(boxes), (labels - 1).long())
        ious = LevelPool.unsort(p.iou, LevelPool.inverse(p.order))
    return list(ious.split([len(b) for b in boxes]))


class NMSPost:
    """Box head + ``heads.nms`` (greedy or DIoU-NMS): the box head's own postprocessing
    (``DetectionRoIHeads.nms_detections``)."""

    candidate_boxes = "per_class"  # how the heads build the candidates (DetectionRoIHeads.candidates)

    @classmethod
    def from_config(cls, inference: InferenceConfig) -> NMSPost:
        return cls()  # heads.nms carries the NMS settings

    def __call__(self, heads, candidates: Candidates, features, image_shapes) -> list[dict[str, Tensor]]:
        return heads.nms_detections(candidates)


class IoURegularNMSPost(NMSPost):
    """IoU predicted for every candidate but unused: regular NMS (the speed control row)."""

    def __call__(self, heads, candidates, features, image_shapes):
        _predict_ious(heads, candidates, features, image_shapes)
        return super().__call__(heads, candidates, features, image_shapes)


class IoUNMSPost:
    """IoU-guided NMS per class; a kept box takes the best class score of its cluster.
    ``candidate_boxes``: per_class | argmax (see ``inference.iou_nms.boxes``)."""

    def __init__(self, rank: str, iou_threshold: float, candidate_boxes: str = "per_class"):
        self.rank = rank
        self.iou_threshold = iou_threshold
        self.candidate_boxes = candidate_boxes

    @classmethod
    def from_config(cls, inference: InferenceConfig) -> IoUNMSPost:
        n = inference.iou_nms
        return cls(n.rank, n.iou_threshold, n.boxes)

    def keep(self, heads, candidates, features, image_shapes) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per image (boxes, new scores, labels, predicted IoU) of the kept boxes, best first."""
        out = []
        for (boxes, scores, labels), ious in zip(candidates, _predict_ious(heads, candidates, features, image_shapes)):
            keep, new_scores = batched_iou_guided_nms(boxes, scores, ious, labels, self.iou_threshold, self.rank)
            keep, new_scores = keep[: heads.detections_per_img], new_scores[: heads.detections_per_img]
            out.append((boxes[keep], new_scores, labels[keep], ious[keep]))
        return out

    def __call__(self, heads, candidates, features, image_shapes):
        return [_detections(b, s, l, heads.detections_per_img)
                for b, s, l, _ in self.keep(heads, candidates, features, image_shapes)]


class RefinePost:
    """IoU-guided NMS, then optimization-based refinement of all kept boxes of the batch at once;
    final score = class score × refined IoU. ``impl``: direct (:mod:`refine_direct`) | autograd
    (:mod:`refine`, the reference; also used when PrRoIPool runs its pure-PyTorch backend)."""

    def __init__(self, nms: IoUNMSPost, lam: float, steps: int, omega1: float, omega2: float,
                 impl: str = "direct"):
        self.nms = nms
        self.candidate_boxes = nms.candidate_boxes
        self.lam, self.steps, self.omega1, self.omega2 = lam, steps, omega1, omega2
        self.impl = impl

    @classmethod
    def from_config(cls, inference: InferenceConfig) -> RefinePost:
        r = inference.refine
        return cls(IoUNMSPost.from_config(inference), r.lam, r.steps, r.omega1, r.omega2, r.impl)

    def __call__(self, heads, candidates, features, image_shapes):
        kept = self.nms.keep(heads, candidates, features, image_shapes)
        refined, ious = self.refine(heads, kept, features, image_shapes)
        counts = [len(k[0]) for k in kept]
        out = []
        for b, (_, s, l, _), iou in zip(refined.split(counts), kept, ious.split(counts)):
            out.append(_detections(b, s * iou.clamp(min=0), l, heads.detections_per_img))
        return out

    def refine(self, heads, kept, features, image_shapes, trace: list | None = None) -> tuple[Tensor, Tensor]:
        """kept: per image (boxes, scores, labels, IoU) from ``IoUNMSPost.keep`` → (refined boxes
        Tensor[D, 4], their IoU Tensor[D]) over the batch. ``trace``: a list to which every IoU
        evaluation appends (boxes Tensor[A, 4], index Tensor[A], need_grad)."""
        counts = [len(k[0]) for k in kept]
        boxes = torch.cat([k[0] for k in kept])
        labels = torch.cat([k[2] for k in kept])
        wh = torch.cat([boxes.new_tensor([[w, h]]).expand(n, 2) for (h, w), n in zip(image_shapes, counts)])
        image_of = torch.repeat_interleave(torch.arange(len(counts), device=boxes.device),
                                           torch.tensor(counts, device=boxes.device))
        args = (wh, self.lam, self.steps, self.omega1, self.omega2)
        if self.impl == "direct" and _resolve_backend(heads.iou_predictor.pooler.backend) == "extension":
            evaluate = DirectIoU(heads.iou_predictor, features, labels, image_of, image_shapes, trace)
            return refine_boxes_direct(boxes, evaluate, *args)

        def predicted_iou(b: Tensor, index: Tensor) -> Tensor:
            if trace is not None:
                trace.append((b.detach().clone(), index, b.requires_grad))
            # index is ascending, so the active boxes are still grouped by image
            per_image = torch.bincount(image_of[index], minlength=len(counts)).tolist()
            return heads.iou_predictor(features, list(b.split(per_image)), labels[index], image_shapes)

        return refine_boxes(boxes, predicted_iou, *args)


# ``inference.mode`` → the class of that mode (CHOICES["inference.mode"] names exactly these; a
# test checks it). Every mode but baseline reads the IoU head: ``config.mode_needs_iou_head``.
MODES = {"baseline": NMSPost, "iou_regular_nms": IoURegularNMSPost, "iou_nms": IoUNMSPost, "refine": RefinePost}


def build_postprocess(inference: InferenceConfig):
    """The callable of ``inference.mode``, built from the inference config (``inference.iou_nms``
    applies to the IoU-guided NMS modes only: iou_nms, refine)."""
    return MODES[inference.mode].from_config(inference)
