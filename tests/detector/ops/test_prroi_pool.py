"""PrRoIPool: the C++ op against the official vectors, REFERENCE.md cases and the PyTorch reference.

The first test to run compiles the CPU extension (~35 s once per source version; cached under
~/.cache/ioulab/extensions).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ioulab.detector.ops import PrRoIPool2d, prroi_pool, prroi_pool_reference
from ioulab.detector.ops.prroi_pool import ensure_ops

# The package exports the function `prroi_pool`, which shadows the submodule of the same name.
prroi_module = importlib.import_module("ioulab.detector.ops.prroi_pool")
# The official reference vectors (80 KB, public), kept with the tests: see testdata/prroi/README.md.
TESTDATA = Path(__file__).resolve().parent / "testdata" / "prroi"
OFFICIAL = ["features", "rois", "real_outputs", "gradients0", "gradients1"]
BACKENDS = ["extension", "reference"]
# Grid cap of the CUDA kernels (prroi_pool_cuda.cu: kMaxBlocks * kThreads).
CUDA_GRID_OUTPUTS = 4096 * 256


def official_vectors(folder: Path = TESTDATA) -> list[torch.Tensor]:
    """features, rois, outputs, d/d features, d/d rois; a missing file fails the test (never skips:
    these vectors are what proves the op matches the paper's code)."""
    missing = [n for n in OFFICIAL if not (folder / f"{n}.npy").is_file()]
    assert not missing, f"official PrRoIPool vectors missing from {folder}: {missing}"
    return [torch.from_numpy(np.load(folder / f"{n}.npy")) for n in OFFICIAL]


def _official():
    return official_vectors()


def _pool_and_grads(input, rois, output_size, scale, backend, grad_out=None):
    """(output, d(sum grad_out * output)/d input, .../d rois)."""
    input = input.detach().clone().requires_grad_()
    rois = rois.detach().clone().requires_grad_()
    out = prroi_pool(input, rois, output_size, scale, backend=backend)
    grad_out = torch.ones_like(out) if grad_out is None else grad_out
    g_input, g_rois = torch.autograd.grad(out, [input, rois], grad_out)
    return out.detach(), g_input, g_rois


def _random_case(seed=0, dtype=torch.float64, images=2, channels=3, height=9, width=11):
    """Random maps and RoIs covering inside, partly off-map, off-map, tiny and large boxes."""
    gen = torch.Generator().manual_seed(seed)
    input = torch.randn(images, channels, height, width, generator=gen, dtype=dtype)
    xy = torch.rand(14, 2, generator=gen, dtype=dtype) * torch.tensor([width, height], dtype=dtype) * 2.4 - 3
    wh = torch.rand(14, 2, generator=gen, dtype=dtype) * 14 + 0.3
    batch = torch.randint(0, images, (14, 1), generator=gen).to(dtype)
    rois = torch.cat([batch, xy, xy + wh], 1)
    return input, rois


# --- published and hand-computed values -------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_official_vectors(backend):
    features, rois, outputs, grad_features, grad_rois = _official()
    out, g_in, g_rois = _pool_and_grads(features, rois, 2, 0.5, backend)
    torch.testing.assert_close(out, outputs, atol=1e-6, rtol=0)
    torch.testing.assert_close(g_in, grad_features, atol=1e-6, rtol=0)
    # README: float32 rounding of the published RoI gradients is ~2e-5.
    torch.testing.assert_close(g_rois, grad_rois, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_vectors_float64_tight(backend):
    features, rois, outputs, grad_features, grad_rois = _official()
    out, g_in, g_rois = _pool_and_grads(features.double(), rois.double(), 2, 0.5, backend)
    assert (out - outputs.double()).abs().max() < 1e-6
    assert (g_rois - grad_rois.double()).abs().max() < 5e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_2x2_case(backend):
    input = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    out, g_in, g_rois = _pool_and_grads(input, rois, 2, 1.0, backend)
    expected = torch.tensor([[[[1.75, 2.25], [2.75, 3.25]]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_rois, torch.tensor([[0.0, 2.0, 4.0, 2.0, 4.0]], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    # Feature gradient of the sum: each pixel's share of the 4 bin means adds up to the RoI's.
    assert g_in.sum().item() == pytest.approx(4.0, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("box, expected", [([0, 0, 4, 4], 0.765625), ([-2, -2, 2, 2], 0.390625),
                                           ([0, 0, 3, 3], 1.0)])
def test_all_ones_map(backend, box, expected):
    ones = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    rois = torch.tensor([[0.0] + box], dtype=torch.float64)
    out = prroi_pool(ones, rois, 1, 1.0, backend=backend)
    assert out.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_bins_equal_avg_pool(backend):
    # RoI (0, 0, 14, 14) at scale 0.5 -> 7 x 7 bins that are exactly the unit cells [i, i+1]^2;
    # the mean of a bilinear patch is the mean of its 4 corners.
    input = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    rois = torch.tensor([[0, 0, 0, 14, 14], [1, 0, 0, 14, 14]], dtype=torch.float64)
    out = prroi_pool(input, rois, 7, 0.5, backend=backend)
    torch.testing.assert_close(out, F.avg_pool2d(input, kernel_size=2, stride=1), atol=1e-12, rtol=0)


# --- the C++ op against the PyTorch reference -------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extension_equals_reference_float64(seed):
    input, rois = _random_case(seed)
    grad_out = torch.randn(rois.shape[0], input.shape[1], 3, 4, dtype=torch.float64)
    got = _pool_and_grads(input, rois, (3, 4), 0.7, "extension", grad_out)
    want = _pool_and_grads(input, rois, (3, 4), 0.7, "reference", grad_out)
    for name, g, w in zip(["output", "grad_input", "grad_rois"], got, want):
        assert (g - w).abs().max().item() <= 1e-10, name
    assert got[0].abs().sum() > 0 and got[2].abs().sum() > 0  # the case is not all zeros


def test_float32_close_to_float64():
    input, rois = _random_case(3)
    out64, g_in64, g_rois64 = _pool_and_grads(input, rois, 2, 0.5, "extension")
    out32, g_in32, g_rois32 = _pool_and_grads(input.float(), rois.float(), 2, 0.5, "extension")
    torch.testing.assert_close(out32.double(), out64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_in32.double(), g_in64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_rois32.double(), g_rois64, atol=1e-3, rtol=1e-4)


# --- gradcheck -------------------------------------------------------------------------------

def _with_batch(batch, coords):
    return torch.cat([batch, coords], 1)


def test_gradcheck_generic_positions():
    # The batch-index column is held fixed (it is an index, not a coordinate).
    gen = torch.Generator().manual_seed(5)
    input = torch.randn(2, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([[0.37, 0.81, 4.13, 3.92], [-1.3, -0.6, 2.2, 6.71],
                           [4.45, 2.05, 7.61, 5.3], [1.1, 1.7, 1.9, 2.6]], dtype=torch.float64)
    coords.requires_grad_()
    batch = torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64)

    def fn(x, c):
        return prroi_pool(x, _with_batch(batch, c), (2, 3), 1.0, backend="extension")

    assert torch.autograd.gradcheck(fn, (input, coords), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_with_spatial_scale():
    gen = torch.Generator().manual_seed(6)
    input = torch.randn(1, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([[1.3, 2.9, 13.7, 15.1], [7.7, 0.3, 19.9, 9.6]], dtype=torch.float64,
                          requires_grad=True)
    batch = torch.zeros(2, 1, dtype=torch.float64)

    def fn(x, c):
        return prroi_pool(x, _with_batch(batch, c), 2, 0.25, backend="extension")

    assert torch.autograd.gradcheck(fn, (input, coords), eps=1e-6, atol=1e-6, rtol=1e-4)


# Bin edges exactly on integer grid lines, including the map border (0, W-1) and the outer edge
# of the zero band (-1, W). f is continuous there but has a kink, so the output is C1 in the
# coordinates (d/dx of the integral is the continuous line integral of f) while its second
# derivative jumps. What is right: the analytic gradient equals BOTH one-sided derivatives, and
# central differences are accurate only to O(eps) instead of O(eps^2).
GRID_ROIS = [[0.0, 0.0, 0.0, 4.0, 2.0], [0.0, -1.0, 1.0, 5.0, 5.0], [0.0, 2.0, -1.0, 4.0, 3.0],
             [0.0, 3.0, 1.0, 6.0, 4.0]]


@pytest.mark.parametrize("roi", GRID_ROIS)
def test_gradient_on_grid_lines_matches_one_sided_differences(roi):
    gen = torch.Generator().manual_seed(7)
    input = torch.randn(1, 2, 5, 5, generator=gen, dtype=torch.float64)
    weights = torch.randn(1, 2, 2, 2, generator=gen, dtype=torch.float64)
    rois = torch.tensor([roi], dtype=torch.float64)

    def loss(r):
        return (prroi_pool(input, r, 2, 1.0, backend="extension") * weights).sum()

    r = rois.clone().requires_grad_()
    (analytic,) = torch.autograd.grad(loss(r), [r])
    _, _, reference = _pool_and_grads(input, rois, 2, 1.0, "reference", weights.expand(1, 2, 2, 2))
    assert (analytic - reference).abs().max() <= 1e-10
    eps = 1e-7
    for j in range(1, 5):
        step = torch.zeros_like(rois)
        step[0, j] = eps
        right = (loss(rois + step) - loss(rois)) / eps
        left = (loss(rois) - loss(rois - step)) / eps
        assert right.item() == pytest.approx(analytic[0, j].item(), abs=1e-5)
        assert left.item() == pytest.approx(analytic[0, j].item(), abs=1e-5)


def test_gradcheck_on_grid_lines():
    # Central differences straddle the kink; the O(eps) error stays inside gradcheck's tolerance.
    gen = torch.Generator().manual_seed(8)
    input = torch.randn(1, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([r[1:] for r in GRID_ROIS], dtype=torch.float64, requires_grad=True)
    batch = torch.zeros(len(GRID_ROIS), 1, dtype=torch.float64)

    def fn(x, c):
        return prroi_pool(x, _with_batch(batch, c), 2, 1.0, backend="extension")

    assert torch.autograd.gradcheck(fn, (input, coords), eps=1e-6, atol=1e-5, rtol=1e-3)


# --- edge cases ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_and_off_map_rois(backend):
    input = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    rois = torch.tensor([
        [0, 2.0, 2.0, 2.0, 4.0],      # zero width
        [0, 2.0, 3.0, 4.0, 3.0],      # zero height
        [0, 4.0, 4.0, 1.0, 1.0],      # inverted
        [0, 20.0, 20.0, 30.0, 30.0],  # off the map (beyond the 1-pixel zero band)
        [0, -9.0, 1.0, -1.0, 3.0],    # off the map, ending where the zero band starts
        [0, -3.0, -2.0, 2.5, 3.0],    # partly off the map
        [0, 4.0, 4.5, 9.0, 8.0],      # partly off the map
    ], dtype=torch.float64)
    out, g_in, g_rois = _pool_and_grads(input, rois, 3, 1.0, backend)
    assert torch.isfinite(out).all() and torch.isfinite(g_in).all() and torch.isfinite(g_rois).all()
    # Zero-area bins output 0 and have no gradient; bins in the zero region output 0.
    assert (out[:5] == 0).all()
    assert (g_rois[:5] == 0).all()
    assert out[5:].abs().sum() > 0 and (g_rois[5:, 1:] != 0).any()
    # Only the partly-off-map RoIs reach the features.
    _, g_only_degenerate, _ = _pool_and_grads(input, rois[:5], 3, 1.0, backend)
    assert (g_only_degenerate == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_coordinates_stay_in_bounds(dtype):
    # Pixel indices are computed from clamped coordinates: no out-of-range reads, finite output.
    input = torch.randn(1, 2, 5, 5, dtype=dtype)
    rois = torch.tensor([[0, -1e30, -1e30, 1e30, 1e30], [0, 1e30, 2.0, 2e30, 3.0],
                         [0, -3e9, 1.0, 2.5, 4.0]], dtype=dtype)
    out, g_in, g_rois = _pool_and_grads(input, rois, 2, 1.0, "extension")
    assert torch.isfinite(out).all() and torch.isfinite(g_in).all() and torch.isfinite(g_rois).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rois(backend):
    input = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    rois = torch.zeros(0, 5, dtype=torch.float64)
    out, g_in, g_rois = _pool_and_grads(input, rois, (2, 3), 1.0, backend, torch.zeros(0, 3, 2, 3, dtype=torch.float64))
    assert out.shape == (0, 3, 2, 3)
    assert g_in.shape == input.shape and (g_in == 0).all()
    assert g_rois.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_index_gradient_is_zero(backend):
    input, rois = _random_case(9)
    _, _, g_rois = _pool_and_grads(input, rois, 2, 0.5, backend)
    assert (g_rois[:, 0] == 0).all()
    assert (g_rois[:, 1:] != 0).any()


def test_non_contiguous_inputs():
    input, rois = _random_case(10)
    # input stored channels-last, rois stored column-major: same values, non-contiguous views.
    input_nc = input.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    rois_nc = rois.t().contiguous().t()
    assert not input_nc.is_contiguous() and not rois_nc.is_contiguous()
    grad_out = torch.randn(rois.shape[0], input.shape[1], 2, 2, dtype=torch.float64)
    grad_nc = grad_out.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    want = _pool_and_grads(input, rois, 2, 0.5, "extension", grad_out)
    got = _pool_and_grads(input_nc, rois_nc, 2, 0.5, "extension", grad_nc)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_more_outputs_than_one_cuda_grid():
    # K * C * PH * PW > the CUDA grid cap, so the grid-stride loops would wrap; on CPU this checks
    # the same indexing of a large output against the reference (tiny map, cheap).
    gen = torch.Generator().manual_seed(11)
    num_rois, channels, size = 2100, 16, 6
    assert num_rois * channels * size * size > CUDA_GRID_OUTPUTS
    input = torch.randn(2, channels, 7, 7, generator=gen)
    xy = torch.rand(num_rois, 2, generator=gen) * 6
    rois = torch.cat([torch.randint(0, 2, (num_rois, 1), generator=gen).float(), xy,
                      xy + torch.rand(num_rois, 2, generator=gen) * 4 + 0.1], 1)
    out = prroi_pool(input, rois, size, 1.0, backend="extension")
    # The RoIs whose outputs lie beyond the first grid's worth, checked against the reference.
    first_beyond = CUDA_GRID_OUTPUTS // (channels * size * size)
    want = prroi_pool_reference(input.double(), rois[first_beyond:].double(), size, 1.0)
    assert (out[first_beyond:].double() - want).abs().max() < 1e-5
    assert out[-1].abs().sum() > 0


# --- API ---------------------------------------------------------------------------------------

def test_module_and_box_list_match_function():
    input, rois = _random_case(12, dtype=torch.float32)
    pool = PrRoIPool2d((2, 3), 0.5)
    assert pool.output_size == (2, 3)
    expected = prroi_pool(input, rois, (2, 3), 0.5)
    torch.testing.assert_close(pool(input, rois), expected, atol=0, rtol=0)
    order = torch.argsort(rois[:, 0], stable=True)
    boxes = [rois[order][rois[order][:, 0] == b, 1:] for b in range(input.shape[0])]
    torch.testing.assert_close(prroi_pool(input, boxes, (2, 3), 0.5), expected[order], atol=0, rtol=0)


def test_backend_from_environment(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return prroi_pool_reference(*args, **kwargs)

    monkeypatch.setattr(prroi_module, "prroi_pool_reference", spy)
    input, rois = _random_case(13)
    monkeypatch.setenv("IOULAB_PRROI_BACKEND", "reference")
    prroi_pool(input, rois, 2)
    assert len(calls) == 1
    prroi_pool(input, rois, 2, backend="extension")  # the argument wins over the environment
    assert len(calls) == 1
    monkeypatch.setenv("IOULAB_PRROI_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="IOULAB_PRROI_BACKEND"):
        prroi_pool(input, rois, 2)


def test_invalid_arguments():
    input, rois = _random_case(14)
    with pytest.raises(ValueError, match="must match"):
        prroi_pool(input, rois.float(), 2)
    with pytest.raises(ValueError, match=r"\[K, 5\]"):
        prroi_pool(input, rois[:, :4], 2)
    bad = rois.clone()
    bad[0, 0] = 5  # no such image
    with pytest.raises(RuntimeError, match="batch indices"):
        prroi_pool(input, bad, 2)
    ensure_ops()
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        torch.ops.ioulab.prroi_pool(input.int(), rois, 1.0, 2, 2)
    with pytest.raises(RuntimeError, match="float32 with a half-type input"):
        torch.ops.ioulab.prroi_pool(input, rois.bfloat16(), 1.0, 2, 2)


def test_opcheck_schema_autograd_and_fake():
    ensure_ops()
    input, rois = _random_case(15)
    input.requires_grad_()
    rois.requires_grad_()
    torch.library.opcheck(torch.ops.ioulab.prroi_pool.default, (input, rois, 0.5, 2, 3),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_missing_official_vectors_fail_instead_of_skipping(tmp_path):
    (tmp_path / "features.npy").write_bytes(b"")
    with pytest.raises(AssertionError, match=r"missing from .*\['rois', 'real_outputs', 'gradients0', 'gradients1'\]"):
        official_vectors(tmp_path)
    shapes = [tuple(t.shape) for t in official_vectors()]  # the copy kept with the tests
    assert shapes == [(4, 2, 24, 32), (2, 5), (2, 2, 2, 2), (4, 2, 24, 32), (2, 5)]
