"""`ioulab bench prroi`: our CPU PrRoIPool against torchvision's roi_align, measured in one run.

Default workload: one FPN P2 map [1, 256, 200, 336] (an 800 x 1344 image at stride 4,
spatial_scale 1/4), 512 RoIs, 7 x 7 bins. The RoIs are the boxes FPN eq. 1 sends to P2: square
root of the area log-uniform in [16, 112) image pixels (4-28 feature pixels), aspect ratio
log-uniform in [1/2, 2], inside the image. roi_align uses sampling_ratio=2, aligned=False.

Rows: forward; forward + backward with the gradient for features and RoI coordinates (roi_align
has no RoI gradient, so its row computes the feature gradient only); forward + backward for the
features only. Ratio = ours / roi_align (targets: forward <= 1.5, forward+backward <= 2).
"""
from __future__ import annotations

import argparse
import math

import torch
from torchvision.ops import roi_align

from ioulab.detector.ops import prroi_pool
from ioulab.detector.ops.prroi_pool import ensure_ops

from .common import BenchResult
from ioulab.platform.smoke import add_smoke_test
from .timing import time_call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--height", type=int, default=200, help="feature map height")
    parser.add_argument("--width", type=int, default=336, help="feature map width")
    parser.add_argument("--spatial-scale", type=float, default=0.25)
    parser.add_argument("--output-size", type=int, default=7)
    parser.add_argument("--min-box", type=float, default=16.0, help="min sqrt(area), image px")
    parser.add_argument("--max-box", type=float, default=112.0, help="max sqrt(area), image px")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    add_smoke_test(parser, "16 RoIs on an 8-channel 32x48 map, one repeat", deprecated_smoke=True)


def make_rois(num: int, image_h: float, image_w: float, min_box: float, max_box: float,
              generator: torch.Generator) -> torch.Tensor:
    """[num, 5] RoIs (batch 0) with log-uniform sqrt(area) and aspect ratio, inside the image."""
    u = torch.rand(num, 4, generator=generator, dtype=torch.float64)
    side = torch.exp(math.log(min_box) + u[:, 0] * (math.log(max_box) - math.log(min_box)))
    aspect = torch.exp((u[:, 1] * 2 - 1) * math.log(2.0))  # h / w
    w, h = side / aspect.sqrt(), side * aspect.sqrt()
    w, h = w.clamp(max=image_w - 1), h.clamp(max=image_h - 1)
    x1 = u[:, 2] * (image_w - w)
    y1 = u[:, 3] * (image_h - h)
    return torch.stack([torch.zeros(num, dtype=torch.float64), x1, y1, x1 + w, y1 + h], 1).float()


def _grad_fn(pool, feature, rois, grad_out, with_rois):
    def step():
        f = feature.detach().requires_grad_()
        r = rois.detach().requires_grad_(with_rois)
        out = pool(f, r)
        torch.autograd.grad(out, [f, r] if with_rois else [f], grad_out)
    return step


def run(args: argparse.Namespace) -> BenchResult:
    if args.smoke_test:
        args.rois, args.channels, args.height, args.width, args.repeats, args.warmup = 16, 8, 32, 48, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_ops()  # compile outside the timed region
    gen = torch.Generator().manual_seed(args.seed)
    size = args.output_size
    feature = torch.randn(1, args.channels, args.height, args.width, generator=gen)
    rois = make_rois(args.rois, args.height / args.spatial_scale, args.width / args.spatial_scale,
                     args.min_box, args.max_box, gen)
    grad_out = torch.randn(args.rois, args.channels, size, size, generator=gen)

    def ours(f, r):
        return prroi_pool(f, r, size, args.spatial_scale, backend="extension")

    def theirs(f, r):
        return roi_align(f, r, size, args.spatial_scale, sampling_ratio=2, aligned=False)

    def measure(fn):
        return 1000 * time_call(fn, repeats=args.repeats, warmup=args.warmup, device=feature.device)

    cases = [
        ("forward", lambda: ours(feature, rois), lambda: theirs(feature, rois), 1.5),
        ("fwd+bwd (features+rois)", _grad_fn(ours, feature, rois, grad_out, True),
         _grad_fn(theirs, feature, rois, grad_out, False), 2.0),
        ("fwd+bwd (features only)", _grad_fn(ours, feature, rois, grad_out, False),
         _grad_fn(theirs, feature, rois, grad_out, False), 2.0),
    ]
    rows = []
    for name, our_fn, their_fn, target in cases:
        with torch.inference_mode(name == "forward"):
            our_ms, their_ms = measure(our_fn), measure(their_fn)
        ratio = our_ms / their_ms
        rows.append({"case": name, "prroi_ms": our_ms, "roi_align_ms": their_ms, "ratio": ratio,
                     "target": f"<= {target}", "met": "yes" if ratio <= target else "no"})
    side = (rois[:, 3] - rois[:, 1]) * args.spatial_scale
    notes = [f"input [1, {args.channels}, {args.height}, {args.width}], {args.rois} RoIs, "
             f"{size}x{size} bins, spatial_scale {args.spatial_scale}, "
             f"RoI width {side.min():.1f}-{side.max():.1f} feature px; "
             f"{torch.get_num_threads()} threads; median of {args.repeats} runs",
             "roi_align: sampling_ratio=2, aligned=False; its backward has no RoI gradient"]
    return BenchResult(title="PrRoIPool (CPU extension) vs torchvision roi_align",
                       columns=["case", "prroi_ms", "roi_align_ms", "ratio", "target", "met"],
                       rows=rows, notes=notes)
