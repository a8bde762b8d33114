"""Precise RoI Pooling (PrRoIPool): the thin Python layer over the ``torch.ops.ioulab`` op.

Shapes:
    N images, C channels, H x W feature map, K RoIs, PH x PW output bins.
    input [N, C, H, W]; rois [K, 5] = (batch_index, x1, y1, x2, y2) in input-image coordinates
    (or a list of N tensors [K_i, 4], like ``torchvision.ops.roi_align``); output [K, C, PH, PW].

Each bin outputs the exact mean of the bilinearly interpolated feature map over the bin
(shared/REFERENCE.md, PrRoIPool), so the output is differentiable in the RoI coordinates too;
the IoUNet refinement uses d(pooled)/d(rois). Gradients are first order only.

Precision: input may be float32, float64, float16 or bfloat16; rois have the input's dtype or,
with a half-type input, float32 (box coordinates in bfloat16 would be rounded to whole pixels or
worse). Half types are computed and accumulated in float32 (the same kernels, see
``csrc/prroi_pool/prroi_pool_math.h``); the output and the feature gradient have the input's
dtype, the RoI gradient has the rois' dtype.

Under ``torch.autocast`` (CPU or CUDA) the op's autocast rule (``csrc/prroi_pool/prroi_pool.cpp``)
runs it in the dtype of the features, whatever the autocast dtype, with the rois cast to the
compute dtype (:func:`rois_dtype`): half-type FPN maps are pooled natively (no float32 copy of the
maps), float32 maps stay float32, and the coordinates and their gradient stay float32.

Backends: ``"extension"`` (default; C++/CUDA kernels, compiled on first use, see ``build.py``) or
``"reference"`` (pure PyTorch, slow). Choose with the ``backend`` argument or the environment
variable ``IOULAB_PRROI_BACKEND``. A failed build raises; there is no silent fallback.
"""
from __future__ import annotations

import os
import threading

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.ops._utils import convert_boxes_to_roi_format

from .prroi_pool_reference import prroi_pool_reference

BACKENDS = ("extension", "reference")
_registered = False
_register_lock = threading.Lock()


def _resolve_backend(backend: str | None) -> str:
    chosen = backend or os.environ.get("IOULAB_PRROI_BACKEND") or "extension"
    if chosen not in BACKENDS:
        raise ValueError(f"unknown PrRoIPool backend {chosen!r} (from "
                         f"{'argument' if backend else 'IOULAB_PRROI_BACKEND'}); use one of {BACKENDS}")
    return chosen


def rois_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in and the autocast rule casts rois to: float32 for the half
    types (and float32), float64 for float64."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def _setup_context(ctx, inputs, output) -> None:
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    ctx.save_for_backward(input, rois, output)
    ctx.geometry = (spatial_scale, pooled_height, pooled_width)


def _backward(ctx, grad_output: Tensor):
    input, rois, output = ctx.saved_tensors
    want_input, want_rois = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input, grad_rois = torch.ops.ioulab.prroi_pool_backward(
        grad_output, input, rois, output, *ctx.geometry, want_input, want_rois)
    return (grad_input if want_input else None, grad_rois if want_rois else None, None, None, None)


def _fake_forward(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                  pooled_width: int) -> Tensor:
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


def _fake_backward(grad_output, input, rois, output, spatial_scale, pooled_height, pooled_width,
                   input_grad, rois_grad):
    return (input.new_empty(input.shape if input_grad else (0,)),
            rois.new_empty(rois.shape if rois_grad else (0,)))


def ensure_ops() -> None:
    """Build/load the extension and register autograd and fake (meta) kernels, once."""
    global _registered
    with _register_lock:
        if _registered:
            return
        # Imported here so that `python -m ioulab.detector.ops.build` does not find its own
        # module already imported through this package.
        from .build import load_extension

        load_extension()
        torch.library.register_autograd("ioulab::prroi_pool", _backward, setup_context=_setup_context)
        torch.library.register_fake("ioulab::prroi_pool")(_fake_forward)
        torch.library.register_fake("ioulab::prroi_pool_backward")(_fake_backward)
        _registered = True


def _check(input: Tensor, rois: Tensor, autocast: bool) -> None:
    if input.dim() != 4:
        raise ValueError(f"prroi_pool: input must be [N, C, H, W], got {tuple(input.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"prroi_pool: rois must be [K, 5], got {tuple(rois.shape)}")
    dtype_ok = autocast or rois.dtype in (input.dtype, rois_dtype(input.dtype))
    if not dtype_ok or rois.device != input.device:
        raise ValueError(f"prroi_pool: rois ({rois.dtype}, {rois.device}) must match input "
                         f"({input.dtype}, {input.device}); float32 rois may go with a float16 or "
                         "bfloat16 input")


def prroi_pool(input: Tensor, rois: Tensor | list[Tensor], output_size: int | tuple[int, int],
               spatial_scale: float = 1.0, backend: str | None = None) -> Tensor:
    """Precise RoI Pooling.

    Args:
        input: [N, C, H, W] float32, float64, float16 or bfloat16.
        rois: [K, 5] (batch_index, x1, y1, x2, y2), or a list of N boxes tensors [K_i, 4]; the
            input's dtype, or float32 with a half-type input (any dtype under autocast).
        output_size: PH = PW, or (PH, PW).
        spatial_scale: feature-map pixels per input pixel (e.g. 1/4 for FPN level P2).
        backend: "extension" | "reference" | None (env IOULAB_PRROI_BACKEND, else "extension").

    Returns:
        [K, C, PH, PW] in the input's dtype; differentiable wrt input and the RoI coordinates
        (batch index: 0).
    """
    if not isinstance(rois, Tensor):
        rois = convert_boxes_to_roi_format(rois)
    autocast = torch.is_autocast_enabled(input.device.type)
    _check(input, rois, autocast)
    pooled_height, pooled_width = _pair(output_size)
    if _resolve_backend(backend) == "reference":
        if autocast:  # the extension's autocast rule, for the reference
            rois = rois.to(rois_dtype(input.dtype))
        return prroi_pool_reference(input, rois, (pooled_height, pooled_width), spatial_scale)
    ensure_ops()
    return torch.ops.ioulab.prroi_pool(input, rois, float(spatial_scale), pooled_height, pooled_width)


class PrRoIPool2d(nn.Module):
    """Module form of :func:`prroi_pool`: forward(input [N, C, H, W], rois [K, 5]) -> [K, C, PH, PW]."""

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float,
                 backend: str | None = None):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = spatial_scale
        self.backend = backend

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return prroi_pool(input, rois, self.output_size, self.spatial_scale, self.backend)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"
