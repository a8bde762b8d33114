"""Precise RoI Pooling in plain PyTorch: the test reference and the explicit fallback backend.

Shapes:
    N images, C channels, H x W feature map, K RoIs, PH x PW output bins.
    input [N, C, H, W]; rois [K, 5] = (batch_index, x1, y1, x2, y2) in input-image coordinates;
    output [K, C, PH, PW].

Math (shared/REFERENCE.md, PrRoIPool): pixel values sit at integer coordinates, f is their
bilinear interpolation and 0 outside the map, and a bin outputs (1/area) * integral of f over the
bin (0 for a zero-area bin). Because f(x, y) = sum_{h,w} F[h, w] hat(x - w) hat(y - h) with
hat(t) = max(0, 1 - |t|), the integral over a box is sum_{h,w} F[h, w] * Iy[h] * Ix[w], where
Ix[w] = Hc(x_hi - w) - Hc(x_lo - w) and Hc is the antiderivative of hat. These are the exact
closed-form integrals of the bilinear patches, not samples.

Gradients come from autograd: Hc is C1, so the derivative wrt a bin edge is hat(edge - w) -- the
exact Leibniz-rule line integral, also on integer grid lines. This is the independent check of the
hand-written RoI gradient in the C++ kernels. Cost is dense in the map width / height
(O(K * C * H * W * PW)), so this backend is slow; RoIs are processed in chunks to bound memory.

Half types are computed in float32 (autocast off) and the output cast back to the input's dtype,
like the kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair


def hat_cdf(t: Tensor) -> Tensor:
    """Antiderivative of hat(t) = max(0, 1 - |t|) that is 0 at -inf (elementwise)."""
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    left = 0.5 * (t + 1) ** 2
    right = 1 - 0.5 * (1 - t) ** 2
    return torch.where(t <= -1, zero, torch.where(t <= 0, left, torch.where(t < 1, right, one)))


def axis_weights(lo: Tensor, hi: Tensor, size: int) -> Tensor:
    """Integral over [lo, hi] of each pixel's interpolation weight along one axis.

    lo, hi: [K, P] bin edges in feature-map pixels. Returns [K, P, size].
    """
    pixels = torch.arange(size, dtype=lo.dtype, device=lo.device)
    return hat_cdf(hi[..., None] - pixels) - hat_cdf(lo[..., None] - pixels)


def _bin_edges(start: Tensor, length: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """start, length: [K] -> (lo, hi) [K, bins] edges of `bins` equal bins."""
    size = length / bins
    index = torch.arange(bins, dtype=start.dtype, device=start.device)
    lo = start[:, None] + size[:, None] * index
    return lo, lo + size[:, None]


def prroi_pool_reference(input: Tensor, rois: Tensor, output_size: int | tuple[int, int],
                         spatial_scale: float = 1.0, roi_chunk: int = 64) -> Tensor:
    """PrRoIPool forward in PyTorch ops (differentiable by autograd wrt input and rois).

    input: [N, C, H, W]; rois: [K, 5]; returns [K, C, PH, PW] in the input's dtype. The
    batch-index column gets no gradient (it is used as an index).
    """
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    with torch.autocast(input.device.type, enabled=False):
        out = _pool(input.to(compute), rois.to(compute), output_size, spatial_scale, roi_chunk)
    return out.to(input.dtype)


def _pool(input: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float,
          roi_chunk: int) -> Tensor:
    pooled_h, pooled_w = _pair(output_size)
    _, channels, height, width = input.shape
    num_rois = rois.shape[0]
    batch = rois[:, 0].detach().long()
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale).unbind(dim=1)
    # Inverted RoIs get zero-size bins (official behaviour).
    roi_w, roi_h = (x2 - x1).clamp(min=0), (y2 - y1).clamp(min=0)
    x_lo, x_hi = _bin_edges(x1, roi_w, pooled_w)
    y_lo, y_hi = _bin_edges(y1, roi_h, pooled_h)
    area = (roi_w / pooled_w) * (roi_h / pooled_h)
    wx = axis_weights(x_lo, x_hi, width)  # [K, PW, W]
    wy = axis_weights(y_lo, y_hi, height)  # [K, PH, H]

    if num_rois == 0 and input.shape[0] == 0:
        return input.new_zeros((0, channels, pooled_h, pooled_w))
    pieces, order = [], []
    # With K = 0 the loop still runs once (on image 0, no RoIs) so the empty output stays
    # connected to the autograd graph.
    for image in torch.unique(batch).tolist() or [0]:
        members = torch.nonzero(batch == image).flatten()
        for chunk in members.split(roi_chunk) if num_rois else [members]:
            rows = torch.einsum("chw,kqw->kchq", input[image], wx[chunk])  # [k, C, H, PW]
            pieces.append(torch.einsum("kph,kchq->kcpq", wy[chunk], rows))
            order.append(chunk)
    integral = torch.cat(pieces)[torch.argsort(torch.cat(order))]
    # Zero-area bins output 0; the safe divisor keeps their gradients finite (0).
    positive = area > 0
    safe_area = torch.where(positive, area, torch.ones_like(area))
    scale = torch.where(positive, 1 / safe_area, torch.zeros_like(area))
    return integral * scale[:, None, None, None]
