"""PrRoIPool in float16 / bfloat16 and under torch.autocast (CPU; the CUDA kernels share the math).

Tolerances, with eps = torch.finfo(dtype).eps (2**-10 for float16, 2**-7 for bfloat16):

* Half kernel vs the float32 kernel on the same (half-rounded) inputs: both accumulate in float32,
  so they differ only by the final rounding of the output / feature gradient to the half type,
  at most eps/2 relative: checked with rtol = eps (plus float32 noise, atol = 64 float32-eps of
  the largest value). The RoI gradient stays float32 (float32 rois) and the half kernel
  recomputes the bin outputs in float32, so it matches the float32 kernel to float32 precision:
  rtol = atol/scale = 64 float32-eps.
* Half kernel vs float32 on the unrounded inputs (the end-to-end error): every output is an
  average of the map (non-negative weights summing to at most 1), so rounding the map moves it by
  at most eps/2 * max|input|, and rounding the output adds eps/2 * |output|: atol = eps * max|input|.
"""
from __future__ import annotations

import pytest
import torch

from ioulab.detector.ops import prroi_pool
from ioulab.detector.ops.prroi_pool import ensure_ops, rois_dtype

HALF_TYPES = [torch.float16, torch.bfloat16]
F32_SLACK = 64 * torch.finfo(torch.float32).eps


def _case(seed: int = 0, images: int = 2, channels: int = 4, height: int = 12, width: int = 14):
    """float32 maps and RoIs (inside, partly off-map, tiny and large, spatial scale 1/2)."""
    gen = torch.Generator().manual_seed(seed)
    input = torch.randn(images, channels, height, width, generator=gen)
    xy = torch.rand(16, 2, generator=gen) * torch.tensor([2.0 * width, 2.0 * height]) * 1.2 - 4
    wh = torch.rand(16, 2, generator=gen) * 20 + 0.2
    batch = torch.randint(0, images, (16, 1), generator=gen).float()
    return input, torch.cat([batch, xy, xy + wh], 1)


def _pool_and_grads(input, rois, grad_out, output_size=(3, 4), scale=0.5, backend=None):
    input = input.detach().clone().requires_grad_()
    rois = rois.detach().clone().requires_grad_()
    out = prroi_pool(input, rois, output_size, scale, backend=backend)
    g_input, g_rois = torch.autograd.grad(out, [input, rois], grad_out)
    return out.detach(), g_input, g_rois


def _close(got, want, rtol, atol_scale, name):
    atol = atol_scale * want.abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_types_match_float32_on_rounded_inputs(dtype, backend):
    input, rois = _case(1)
    grad_out = torch.randn(rois.shape[0], input.shape[1], 3, 4).to(dtype)
    half = input.to(dtype)
    out, g_input, g_rois = _pool_and_grads(half, rois, grad_out, backend=backend)
    assert (out.dtype, g_input.dtype, g_rois.dtype) == (dtype, dtype, torch.float32)
    ref_out, ref_input, ref_rois = _pool_and_grads(half.float(), rois, grad_out.float(), backend=backend)
    eps = torch.finfo(dtype).eps
    _close(out, ref_out, eps, F32_SLACK, "output")
    _close(g_input, ref_input, eps, F32_SLACK, "grad_input")
    _close(g_rois, ref_rois, F32_SLACK, F32_SLACK, "grad_rois")


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_output_within_eps_of_float32(dtype):
    input, rois = _case(2)
    out = prroi_pool(input.to(dtype), rois, (3, 4), 0.5)
    ref = prroi_pool(input, rois, (3, 4), 0.5)
    bound = torch.finfo(dtype).eps * input.abs().max().item()
    assert (out.float() - ref).abs().max().item() <= bound


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_rois_and_narrow_bins(dtype):
    """rois in the half type are accepted (gradient in that dtype); on narrow bins (0.05 px) the
    RoI gradient still matches float32: the bin outputs are recomputed in float32."""
    input, _ = _case(3, images=1)
    rois = torch.tensor([[0, 4.0, 6.0, 4.2, 6.3], [0, 10.0, 3.0, 18.0, 11.0]])
    grad_out = torch.ones(2, input.shape[1], 4, 4, dtype=dtype)
    half = input.to(dtype)
    _, _, g_rois = _pool_and_grads(half, rois, grad_out, (4, 4), 1.0)
    _, _, ref = _pool_and_grads(half.float(), rois, grad_out.float(), (4, 4), 1.0)
    _close(g_rois, ref, F32_SLACK, F32_SLACK, "grad_rois narrow bins")
    out, _, g_half_rois = _pool_and_grads(half, rois.to(dtype), grad_out, (4, 4), 1.0)
    assert out.dtype == dtype and g_half_rois.dtype == dtype


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_autocast_runs_in_the_features_dtype(dtype):
    """The autocast rule: features keep their dtype, rois go to the compute dtype (float32)."""
    input, rois = _case(4)
    with torch.autocast("cpu", dtype=dtype):
        out32 = prroi_pool(input, rois, 2, 0.5)  # float32 maps stay float32
        half_in = input.to(dtype).requires_grad_()
        coords = rois.double().requires_grad_()  # any rois dtype: cast by the rule
        out = prroi_pool(half_in, coords, 2, 0.5)
        direct = torch.ops.ioulab.prroi_pool(half_in, rois.to(dtype), 0.5, 2, 2)
    assert out32.dtype == torch.float32 and out.dtype == dtype and direct.dtype == dtype
    torch.testing.assert_close(out32, prroi_pool(input, rois, 2, 0.5))
    torch.testing.assert_close(out, prroi_pool(input.to(dtype), rois, 2, 0.5))
    g_in, g_rois = torch.autograd.grad(out.float().sum(), [half_in, coords])
    assert g_in.dtype == dtype and g_rois.dtype == torch.float64 and torch.isfinite(g_rois).all()
    # The reference backend follows the same rule.
    with torch.autocast("cpu", dtype=dtype):
        ref = prroi_pool(input.to(dtype), rois.double(), 2, 0.5, backend="reference")
    assert ref.dtype == dtype


def test_autocast_rule_registered_for_cpu_and_cuda():
    ensure_ops()
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("ioulab::prroi_pool", key), key
    assert rois_dtype(torch.bfloat16) == torch.float32 and rois_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_opcheck_half_input_float32_rois(dtype):
    """Schema, autograd registration and the fake kernels' dtypes hold for the mixed signature."""
    ensure_ops()
    input, rois = _case(5)
    input = input.to(dtype).requires_grad_()
    rois.requires_grad_()
    torch.library.opcheck(torch.ops.ioulab.prroi_pool.default, (input, rois, 0.5, 2, 3),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
