"""IoUNet's IoU head: predicts, per class, the IoU of a box with the object it localizes.

Shape glossary: R boxes, C channels of the pooled features, P×P pool size, K foreground classes.

    pooled Tensor[R, C, P, P] → flatten → FC → ReLU → FC → ReLU → FC → raw Tensor[R, K]

Under ``torch.autocast`` the last FC runs in float32 (autocast off, input cast up): the raw IoU
feeds thresholds as fine as 0.001 (the refinement's stop rule) and IoU-guided NMS ranks boxes by
it, and bfloat16 resolves only ~0.004 around 0.8. It is a (representation × K) layer: cheap.

Initialisation (``init``): ioulab — fc1, fc2 PyTorch's default, output N(0, 0.001), bias 0;
reference — what the IoUNet reproduction's code runs: its init_cfg lists Normal(std 0.01) for the
output and then Xavier for ``layer='Linear'``, and mmcv applies the second to every Linear, the
output included (the pattern its author reported as mmdetection issue #6238), so all three are
Xavier-normal (gain 1), biases 0; reference_as_written — what that config states: Xavier-normal
fc1, fc2 and output N(0, 0.01), biases 0.

The prediction for a box is the column of its class (label l ∈ 1..K → column l − 1). The raw output
is decoded by the loss's parametrisation (:class:`IoULoss`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class IoUHead(nn.Module):
    def __init__(self, in_channels: int, pool_size: int, representation_size: int, num_classes: int,
                 init: str = "ioulab"):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * pool_size**2, representation_size)
        self.fc2 = nn.Linear(representation_size, representation_size)
        self.out = nn.Linear(representation_size, num_classes)
        if init != "ioulab":
            for fc in (self.fc1, self.fc2):
                nn.init.xavier_normal_(fc.weight)
                nn.init.zeros_(fc.bias)
        if init == "reference":
            nn.init.xavier_normal_(self.out.weight)
        else:
            nn.init.normal_(self.out.weight, std={"ioulab": 0.001, "reference_as_written": 0.01}[init])
        nn.init.zeros_(self.out.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        x = F.relu(self.fc2(F.relu(self.fc1(pooled.flatten(1)))))
        with torch.autocast(x.device.type, enabled=False):
            return self.out(x.to(self.out.weight.dtype))


def select_class(raw: Tensor, labels: Tensor) -> Tensor:
    """raw Tensor[R, K], labels Tensor[R] in 1..K → Tensor[R]."""
    return raw.gather(1, (labels - 1).long().unsqueeze(1)).squeeze(1)


class IoULoss:
    """A loss on predicted IoU with the matching decoding of the raw head output.

    smooth_l1: target (IoU − 0.5)/0.5, Smooth-L1 (β = 1), decoded as raw·0.5 + 0.5;
    bce: binary cross-entropy with logits on the raw IoU, decoded by a sigmoid.
    Losses are averaged over the RoIs (all have IoU ≥ 0.5).
    """

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor], decode: Callable[[Tensor], Tensor]):
        self.loss = loss
        self.decode = decode

    def __call__(self, raw: Tensor, iou_target: Tensor) -> Tensor:
        if raw.numel() == 0:
            return raw.sum() * 0.0
        return self.loss(raw.float(), iou_target.float())


SMOOTH_L1 = IoULoss(lambda raw, t: F.smooth_l1_loss(raw, (t - 0.5) / 0.5, beta=1.0),
                    lambda raw: raw * 0.5 + 0.5)
BCE = IoULoss(F.binary_cross_entropy_with_logits, torch.sigmoid)
IOU_LOSSES = {"smooth_l1": SMOOTH_L1, "bce": BCE}
