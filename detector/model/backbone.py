"""Backbones with FPN: torchvision's ResNet-FPN, and a tiny conv net for CPU runs.

Shape glossary: N images, C channels, H×W input size. Every backbone returns
``OrderedDict[str, Tensor[N, fpn_channels, H/s, W/s]]`` with keys "0".."3" for strides 4, 8, 16, 32
and "pool" for stride 64 (torchvision's ``LastLevelMaxPool``), and has ``out_channels``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import misc as misc_ops

RESNET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
}


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TinyBody(nn.Module):
    """Four stages of 3×3 conv-BN-ReLU at strides 4, 8, 16, 32 (``layer1``..``layer4``).

    Small enough for a 2-core CPU at 128 px; two convs per stage give the receptive field that
    objects of 12–60 px need.
    """

    def __init__(self, widths: list[int]):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"tiny backbone needs 4 stage widths, got {widths}")
        w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(_conv_bn(3, w1 // 2, 2), _conv_bn(w1 // 2, w1, 2))
        self.layer1 = _conv_bn(w1, w1, 1)
        self.layer2 = nn.Sequential(_conv_bn(w1, w2, 2), _conv_bn(w2, w2, 1))
        self.layer3 = nn.Sequential(_conv_bn(w2, w3, 2), _conv_bn(w3, w3, 1))
        self.layer4 = nn.Sequential(_conv_bn(w3, w4, 2), _conv_bn(w4, w4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - used via IntermediateLayerGetter
        for m in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = m(x)
        return x


def tiny_fpn_backbone(widths: list[int], fpn_channels: int) -> BackboneWithFPN:
    body = TinyBody(widths)
    return_layers = OrderedDict((f"layer{i + 1}", str(i)) for i in range(4))
    return BackboneWithFPN(body, return_layers, in_channels_list=list(widths), out_channels=fpn_channels)


def resnet_fpn(name: str, pretrained: bool, trainable_layers: int, fpn_channels: int) -> BackboneWithFPN:
    """torchvision's ResNet-FPN. ``pretrained`` downloads ImageNet weights, so it is never the
    default. As torchvision's own ``fasterrcnn_resnet50_fpn``: frozen BatchNorm and
    ``trainable_layers`` with ImageNet weights; trainable BatchNorm and all layers from scratch."""
    backbone = resnet_fpn_backbone(
        backbone_name=name,
        weights=RESNET_WEIGHTS[name] if pretrained else None,
        norm_layer=misc_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d,
        trainable_layers=trainable_layers if pretrained else 5,
    )
    if fpn_channels != backbone.out_channels:
        raise ValueError("ResNet-FPN in torchvision has 256 FPN channels; set model.backbone.fpn_channels=256")
    return backbone
