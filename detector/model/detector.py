"""Faster R-CNN assembled from torchvision's detection components.

Shape glossary: N images; each image Tensor[3, H, W] in [0, 1]; targets per image
``{"boxes": Tensor[G, 4] xyxy, "labels": Tensor[G]}`` (plus ``"sample_key": int`` in training
with ``train.sampling: per_image``, see ``model/sampling.py``); detections per image
``{"boxes": Tensor[D, 4], "scores": Tensor[D], "labels": Tensor[D]}`` in input-image pixels.
"""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ioulab.detector.model.sampling import keyed, keyed_copy


class Detector(GeneralizedRCNN):
    """transform → backbone+FPN → RPN → RoI heads → postprocess (torchvision's
    ``GeneralizedRCNN.forward``). Training returns the *unweighted* loss terms plus statistics;
    ``loss_weights`` says which terms are losses and how much each counts (one place for the
    criterion, DETR style): ``total = sum(loss_weights[k] * out[k])``."""

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: nn.Module,
                 transform: GeneralizedRCNNTransform, loss_weights: dict[str, float]):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.loss_weights = dict(loss_weights)
        # the same sampling, able to draw per image from a key (data parallelism: model/sampling.py)
        rpn.fg_bg_sampler = keyed_copy(rpn.fg_bg_sampler)
        roi_heads.fg_bg_sampler = keyed_copy(roi_heads.fg_bg_sampler)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        """torchvision's forward; targets that all carry ``sample_key`` key the RPN's and RoI
        heads' sampling per image."""
        keys = None
        if targets is not None and targets and all("sample_key" in t for t in targets):
            keys = [int(t["sample_key"]) for t in targets]
        with keyed([self.rpn.fg_bg_sampler, self.roi_heads.fg_bg_sampler], keys):
            return super().forward(images, targets)

    def weighted_losses(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss terms of ``terms`` scaled by their weights (statistics are left out)."""
        return {k: terms[k] * w for k, w in self.loss_weights.items() if k in terms}
