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
        return self.activations(pooled)[2]

    def activations(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(h1 Tensor[R, S], h2 Tensor[R, S], raw Tensor[R, K]): the two ReLU outputs (S =
        representation size) and the raw output; :meth:`input_grad` needs the first two."""
        h1 = F.relu(self.fc1(pooled.flatten(1)))
        h2 = F.relu(self.fc2(h1))
        with torch.autocast(h2.device.type, enabled=False):
            return h1, h2, self.out(_as(h2, self.out.weight.dtype))

    def input_grad(self, h1: Tensor, h2: Tensor, columns: Tensor, slope: Tensor | float) -> Tensor:
        """d Σ_r decode(raw[r, columns[r]]) / d pooled, without autograd: Tensor[R, C·P·P]
        (reshape to the pooled features' shape). ``columns`` Tensor[R] int64 = label − 1;
        ``slope`` (Tensor[R] or one number) is d decode / d raw at each box's prediction. Two ReLU
        masks and two matmuls, in the dtypes autograd would use (under autocast: the gradient
        enters fc2 in h2's dtype)."""
        g = self.out.weight.index_select(0, columns)
        g = g * slope if isinstance(slope, float) else g * slope.unsqueeze(1)
        g = torch.ops.aten.threshold_backward(_as(g, h2.dtype), h2, 0)
        g = torch.ops.aten.threshold_backward(torch.mm(g, _as(self.fc2.weight, g.dtype)), h1, 0)
        return torch.mm(g, _as(self.fc1.weight, g.dtype))


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)  # no operator dispatched when nothing changes


def select_class(raw: Tensor, labels: Tensor) -> Tensor:
    """raw Tensor[R, K], labels Tensor[R] in 1..K → Tensor[R]."""
    return raw.gather(1, (labels - 1).long().unsqueeze(1)).squeeze(1)


class IoULoss:
    """A loss on predicted IoU with the matching decoding of the raw head output.

    smooth_l1: target (IoU − 0.5)/0.5, Smooth-L1 (β = 1), decoded as raw·0.5 + 0.5;
    bce: binary cross-entropy with logits on the raw IoU, decoded by a sigmoid.
    Losses are averaged over the RoIs (all have IoU ≥ 0.5).
    """

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor], decode: Callable[[Tensor], Tensor],
                 slope: Callable[[Tensor], Tensor | float]):
        self.loss = loss
        self.decode = decode
        self.slope = slope  # decoded IoU Tensor[R] → d decode / d raw, Tensor[R] or a constant (refinement)

    def __call__(self, raw: Tensor, iou_target: Tensor) -> Tensor:
        if raw.numel() == 0:
            return raw.sum() * 0.0
        return self.loss(raw.float(), iou_target.float())


SMOOTH_L1 = IoULoss(lambda raw, t: F.smooth_l1_loss(raw, (t - 0.5) / 0.5, beta=1.0),
                    lambda raw: raw * 0.5 + 0.5, lambda iou: 0.5)
BCE = IoULoss(F.binary_cross_entropy_with_logits, torch.sigmoid, lambda iou: iou * (1 - iou))
IOU_LOSSES = {"smooth_l1": SMOOTH_L1, "bce": BCE}
