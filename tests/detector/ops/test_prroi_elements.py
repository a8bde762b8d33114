"""The CUDA kernels' per-element bodies (csrc/prroi_pool/prroi_pool_elements.h), run serially on
the CPU through a test-only op, against the PyTorch reference.

No GPU here, so this is how the code the GPU executes gets checked (besides the nvcc compile
check). The probe compiles once per header version (~30 s), cached like the extension.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import pytest
import torch

from ioulab.detector.ops import prroi_pool_reference

build = importlib.import_module("ioulab.detector.ops.build")
PROBE = Path(__file__).with_name("prroi_elements_probe.cpp")


@pytest.fixture(scope="module")
def elements():
    digest = hashlib.sha256(PROBE.read_bytes())
    for name in build._HEADERS:
        digest.update((build.source_dir() / name).read_bytes())
    digest.update(torch.__version__.encode())
    tag = digest.hexdigest()[:16]
    if not hasattr(torch.ops.ioulab_probe, "prroi_elements"):
        build.compile_and_load(f"ioulab_probe_{tag}", [PROBE], build._cache_root() / f"probe-{tag}",
                               with_cuda=False, include_dirs=[build.source_dir()])
    return torch.ops.ioulab_probe.prroi_elements


def _reference(input, rois, grad_out, output_size, scale):
    input = input.clone().requires_grad_()
    rois = rois.clone().requires_grad_()
    out = prroi_pool_reference(input, rois, output_size, scale)
    g_input, g_rois = torch.autograd.grad(out, [input, rois], grad_out)
    return out.detach(), g_input, g_rois


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    input = torch.randn(2, 3, 8, 10, generator=gen, dtype=torch.float64)
    xy = torch.rand(12, 2, generator=gen, dtype=torch.float64) * 24 - 3
    wh = torch.rand(12, 2, generator=gen, dtype=torch.float64) * 12 + 0.2
    batch = torch.randint(0, 2, (12, 1), generator=gen).double()
    rois = torch.cat([batch, xy, xy + wh], 1)
    rois[0, 1:] = torch.tensor([2.0, 1.0, 6.0, 5.0])  # edges on grid lines
    rois[1, 3] = rois[1, 1]  # zero width
    rois[2, 1:] = torch.tensor([5.0, 5.0, 1.0, 1.0])  # inverted
    return input, rois


@pytest.mark.parametrize("seed", [0, 1])
def test_elements_equal_reference(elements, seed):
    input, rois = _case(seed)
    grad_out = torch.randn(rois.shape[0], 3, 3, 2, dtype=torch.float64)
    got = elements(input, rois, grad_out, 0.6, 3, 2)
    want = _reference(input, rois, grad_out, (3, 2), 0.6)
    for name, g, w in zip(["output", "grad_input", "grad_rois"], got, want):
        assert (g - w).abs().max().item() <= 1e-10, name


def test_elements_official_vectors(elements):
    from tests.detector.ops.test_prroi_pool import official_vectors

    features, rois, outputs, grad_features, grad_rois = official_vectors()
    out, g_in, g_rois = elements(features, rois, torch.ones_like(outputs), 0.5, 2, 2)
    torch.testing.assert_close(out, outputs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_in, grad_features, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_rois, grad_rois, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elements_half_types_match_cpu_kernel(elements, dtype):
    """The CUDA element bodies in float16 / bfloat16 (float32 rois and accumulation) agree with
    the CPU kernel in the same dtype: both compute in float32 and round once, so they differ by
    at most one rounding of the half type (rtol = eps) plus float32 noise; the RoI gradients are
    float32 (rtol 64 float32-eps). Tolerances as in test_prroi_pool_amp.py."""
    from ioulab.detector.ops import prroi_pool

    input, rois = (t.float() for t in _case(2))
    half = input.to(dtype)
    grad_out = torch.randn(rois.shape[0], 3, 3, 2).to(dtype)
    got = elements(half, rois, grad_out, 0.6, 3, 2)
    x = half.clone().requires_grad_()
    r = rois.clone().requires_grad_()
    out = prroi_pool(x, r, (3, 2), 0.6)
    want = (out.detach(), *torch.autograd.grad(out, [x, r], grad_out))
    eps, f32 = torch.finfo(dtype).eps, 64 * torch.finfo(torch.float32).eps
    for name, g, w, rtol in zip(["output", "grad_input", "grad_rois"], got, want, [eps, eps, f32]):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=f32 * w.abs().max().item(), msg=name)
