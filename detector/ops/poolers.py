"""Multi-level (FPN) Precise RoI Pooling: a drop-in for ``torchvision.ops.MultiScaleRoIAlign``.

Shapes:
    L levels, C channels, K = sum_i K_i boxes over the batch, PH x PW output bins.
    x: {name: [N, C, H_l, W_l]}; boxes: list of N tensors [K_i, 4] (x1, y1, x2, y2) in image
    coordinates; image_shapes: list of N (height, width); output [K, C, PH, PW] in box order.

Scale inference and the level of each box (FPN eq. 1, k = floor(k0 + log2(sqrt(wh) / 224)))
are torchvision's own helpers, so the level assignment is identical to MultiScaleRoIAlign's.
Only the pooling differs: PrRoIPool is differentiable in the box coordinates, so
d(output)/d(boxes) reaches the boxes tensors (needed by the IoUNet refinement).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops.poolers import LevelMapper, _convert_to_roi_format, _filter_input, _setup_scales

from .prroi_pool import prroi_pool


def multiscale_prroi_pool(features: list[Tensor], boxes: list[Tensor], output_size: tuple[int, int],
                          scales: list[float], mapper: LevelMapper, backend: str | None = None) -> Tensor:
    """Pool each box from its FPN level. features: L tensors [N, C, H_l, W_l] -> [K, C, PH, PW]."""
    rois = _convert_to_roi_format(boxes)
    if len(features) == 1:
        return prroi_pool(features[0], rois, output_size, scales[0], backend)
    levels = mapper(boxes)
    pieces, order = [], []
    for level, (feature, scale) in enumerate(zip(features, scales)):
        members = torch.where(levels == level)[0]
        if members.numel() == 0:
            continue  # an empty call still costs an op dispatch and an autograd node
        pieces.append(prroi_pool(feature, rois[members], output_size, scale, backend).to(features[0].dtype))
        order.append(members)
    if not pieces:
        return features[0].new_zeros((0, features[0].shape[1], *output_size))
    if len(pieces) == 1:
        return pieces[0]  # one level holds every box, in box order (torch.where is sorted)
    # Concatenate and undo the grouping by level (differentiable, unlike filling a buffer in place).
    return torch.cat(pieces)[torch.argsort(torch.cat(order))]


class MultiScalePrRoIPool(nn.Module):
    """Precise RoI Pooling over FPN levels; same constructor knobs and forward as MultiScaleRoIAlign.

    Args:
        featmap_names: names of the feature maps in ``x`` to pool from (finest first).
        output_size: PH = PW, or (PH, PW).
        canonical_scale, canonical_level: FPN eq. 1 (box of canonical_scale^2 px -> that level).
        backend: PrRoIPool backend ("extension" | "reference" | None, see ``prroi_pool``).
    """

    def __init__(self, featmap_names: list[str], output_size: int | tuple[int, int],
                 canonical_scale: int = 224, canonical_level: int = 4, backend: str | None = None):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.backend = backend
        # Inferred on the first call, like MultiScaleRoIAlign (the FPN strides never change).
        self.scales: list[float] | None = None
        self.map_levels: LevelMapper | None = None

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level)
        return multiscale_prroi_pool(features, boxes, self.output_size, self.scales, self.map_levels,
                                     self.backend)

    def extra_repr(self) -> str:
        return f"featmap_names={self.featmap_names}, output_size={self.output_size}"


class LevelPool:
    """Multi-level PrRoIPool of one box set and its box-coordinate gradient, without autograd (the
    IoUNet refinement's step: no autograd graph, no feature gradient, one level assignment).

    Shapes: A boxes, L levels, C channels, PH x PW bins. The boxes are pooled grouped by level
    (stable order within a level); ``pool`` returns that grouping's order so the caller keeps its
    per-box tensors in it and restores box order once, on the small results (:meth:`unsort`).
    Same level assignment (torchvision's ``LevelMapper``) and the same kernels as
    :class:`MultiScalePrRoIPool`, so the pooled features are the same numbers.
    """

    def __init__(self, pooler: MultiScalePrRoIPool, x: dict[str, Tensor], image_shapes: list[tuple[int, int]]):
        from .prroi_pool import ensure_ops

        ensure_ops()
        self.features = _filter_input(x, pooler.featmap_names)
        if pooler.scales is None or pooler.map_levels is None:
            pooler.scales, pooler.map_levels = _setup_scales(
                self.features, image_shapes, pooler.canonical_scale, pooler.canonical_level)
        self.scales, self.mapper = pooler.scales, pooler.map_levels
        self.output_size = pooler.output_size

    def levels(self, sizes: Tensor) -> Tensor:
        """sizes Tensor[A, 2] (w, h) → FPN level Tensor[A] int64 (``LevelMapper.k_min`` = the finest
        map): ``LevelMapper``'s arithmetic (sqrt of the area, FPN eq. 1 with its eps, clamp), the
        same values in fewer operators."""
        m = self.mapper
        k = sizes.prod(1).sqrt_().div_(m.s0).log2_().add_(m.lvl0).add_(m.eps).floor_()
        return k.clamp_(m.k_min, m.k_max).long()

    def pool(self, rois: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, Tensor | None, list]:
        """rois Tensor[A, 5] (and their (w, h) Tensor[A, 2] if known) → (pooled Tensor[A, C, PH, PW]
        in level order, order Tensor[A] (level order → box index; None: box order, when one level
        holds every box), state for :meth:`box_grad`)."""
        order, groups = None, [(0, rois)]
        if len(self.features) > 1:
            levels = self.levels(rois[:, 3:] - rois[:, 1:3] if sizes is None else sizes)
            k_min = self.mapper.k_min
            counts = torch.bincount(levels, minlength=k_min + len(self.features)).tolist()[k_min:]  # the one host sync
            filled = [level for level, n in enumerate(counts) if n]
            if len(filled) == 1:
                groups = [(filled[0], rois)]
            else:
                order = levels.argsort(stable=True)
                groups = [(level, r) for level, r in enumerate(rois.index_select(0, order).split(counts)) if len(r)]
        outputs = [torch.ops.ioulab.prroi_pool(self.features[level], r, float(self.scales[level]), *self.output_size)
                   for level, r in groups]
        return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), order, list(zip(groups, outputs))

    def box_grad(self, state: list, grad_pooled: Tensor) -> Tensor:
        """d Σ(grad_pooled · pooled) / d box coordinates, Tensor[A, 4] in level order (like the
        pooled features); no feature gradient is computed."""
        pieces = [grad_pooled] if len(state) == 1 else grad_pooled.split([len(r) for (_, r), _ in state])
        parts = [torch.ops.ioulab.prroi_pool_backward(g, self.features[level], r, output, float(self.scales[level]),
                                                      *self.output_size, False, True)[1]
                 for g, ((level, r), output) in zip(pieces, state)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts))[:, 1:]

    @staticmethod
    def inverse(order: Tensor | None) -> Tensor | None:
        """The permutation that puts per-box values in level order back in box order."""
        return None if order is None else order.argsort()

    @staticmethod
    def unsort(x: Tensor, inverse: Tensor | None) -> Tensor:
        """Per-box values in level order → box order (``inverse`` from :meth:`inverse`)."""
        return x if inverse is None else x.index_select(0, inverse)
