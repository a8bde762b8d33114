"""`ioulab bench nms`: our DIoU-NMS and IoU-guided NMS against torchvision's batched_nms on CPU.

The input imitates a detector's pre-NMS output: boxes jittered around a few objects (centre
±15% of the object size, sides ×exp(N(0, 0.15))), half of them labelled with their object's class
and half with a random class, uniform random scores. Everything runs in one process on the same
inputs; the table gives median wall times and the ratio to torchvision's ``batched_nms``
(median over rounds of the ratio within a round).

Target: ``batched_diou_nms`` within 3x of ``torchvision.ops.batched_nms``.
The "coordinate offset" row is the other way to batch per class (torchvision's trick: shift each
class's boxes apart and run the one-class op once), kept to show which is cheaper.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.ops import batched_nms

from ioulab.detector.nms import batched_diou_nms, batched_iou_guided_nms, diou_nms
from ioulab.platform.bench.common import BenchResult
from ioulab.platform.bench.timing import time_call
from ioulab.platform.smoke import add_smoke_test

TARGET_RATIO = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-boxes", type=int, default=2000)
    parser.add_argument("--classes", type=int, nargs="+", default=[5, 80],
                        help="number of classes, one table block each")
    parser.add_argument("--objects", type=int, default=30, help="objects the boxes cluster around")
    parser.add_argument("--image-size", type=float, default=800.0)
    parser.add_argument("--iou-threshold", type=float, default=0.5)
    parser.add_argument("--beta", type=float, default=1.0, help="DIoU-NMS exponent β")
    parser.add_argument("--repeats", type=int, default=50, help="calls per method (rounds of 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads for the run (0: leave torch's default)")
    add_smoke_test(parser, "200 boxes, 2 repeats")


def synthetic_detections(num_boxes: int, num_classes: int, num_objects: int, image_size: float,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clustered boxes: Tensor[N, 4] xyxy, scores: Tensor[N], labels: Tensor[N] int64."""
    g = torch.Generator().manual_seed(seed)
    obj_wh = 20 + 280 * torch.rand(num_objects, 2, generator=g)
    obj_ctr = obj_wh / 2 + (image_size - obj_wh) * torch.rand(num_objects, 2, generator=g)
    obj_cls = torch.randint(num_classes, (num_objects,), generator=g)
    obj = torch.randint(num_objects, (num_boxes,), generator=g)
    ctr = obj_ctr[obj] + 0.15 * obj_wh[obj] * torch.randn(num_boxes, 2, generator=g)
    wh = obj_wh[obj] * torch.exp(0.15 * torch.randn(num_boxes, 2, generator=g))
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    random_cls = torch.randint(num_classes, (num_boxes,), generator=g)
    labels = torch.where(torch.rand(num_boxes, generator=g) < 0.5, obj_cls[obj], random_cls)
    scores = torch.rand(num_boxes, generator=g)
    return boxes, scores, labels


def _offset_diou_nms(boxes, scores, labels, iou_threshold, beta):
    # torchvision's batching trick: classes moved apart so that they never overlap.
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return diou_nms(boxes + offsets[:, None], scores, iou_threshold, beta)


def run(args: argparse.Namespace) -> BenchResult:
    if args.threads:
        torch.set_num_threads(args.threads)
    num_boxes, repeats, warmup = args.num_boxes, args.repeats, args.warmup
    if args.smoke_test:
        num_boxes, repeats, warmup = 200, 2, 1
    thr, beta = args.iou_threshold, args.beta
    rows, notes, ratios = [], [], {}
    for num_classes in args.classes:
        boxes, scores, labels = synthetic_detections(num_boxes, num_classes, args.objects,
                                                     args.image_size, args.seed)
        # Stand-in for the IoU head's predictions: any values in [0, 1] exercise the same code.
        ious = torch.rand(num_boxes, generator=torch.Generator().manual_seed(args.seed + 1))
        methods = {
            "torchvision batched_nms": lambda: batched_nms(boxes, scores, labels, thr),
            "batched_diou_nms": lambda: batched_diou_nms(boxes, scores, labels, thr, beta),
            "diou_nms + coordinate offset": lambda: _offset_diou_nms(boxes, scores, labels, thr,
                                                                       beta),
            "batched_iou_guided_nms": lambda: batched_iou_guided_nms(boxes, scores, ious, labels,
                                                                     thr)[0],
        }
        # Round-robin: each round times every method back to back, and a method's ratio is the
        # median over rounds of its time / torchvision's time in the same round, so a burst of
        # load on this shared machine hits both sides of a ratio alike.
        rounds = max(1, repeats // 5)
        times = {name: [] for name in methods}
        for r in range(rounds):
            for name, fn in methods.items():
                times[name].append(time_call(fn, repeats=5, warmup=warmup if r == 0 else 1,
                                             device=boxes.device))
        base_times = times["torchvision batched_nms"]
        for name, fn in methods.items():
            paired = [t / b for t, b in zip(times[name], base_times)]
            rows.append({"classes": num_classes, "boxes": num_boxes, "method": name,
                         "median_ms": statistics.median(times[name]) * 1e3,
                         "ratio": statistics.median(paired), "kept": int(fn().numel())})
        ratio = next(r["ratio"] for r in rows
                     if r["classes"] == num_classes and r["method"] == "batched_diou_nms")
        ratios[str(num_classes)] = ratio
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        if args.smoke_test:
            verdict = "smoke test, no verdict on"
        notes.append(f"{num_classes} classes: batched_diou_nms / batched_nms = {ratio:.2f} "
                     f"({verdict} the {TARGET_RATIO:g}x target)")
    notes.append(f"iou_threshold={thr}, beta={beta}, {torch.get_num_threads()} torch threads, "
                 f"median ms over {max(1, repeats // 5)} rounds of 5 calls; ratio: median over "
                 f"rounds of time / torchvision's time in the same round"
                 + ("; SMOKE TEST: sizes reduced, times meaningless" if args.smoke_test else ""))
    return BenchResult(
        title="NMS on CPU: DIoU-NMS / IoU-guided NMS vs torchvision.ops.batched_nms",
        columns=["classes", "boxes", "method", "median_ms", "ratio", "kept"],
        rows=rows, notes=notes,
        extra={"target_ratio": TARGET_RATIO, "diou_ratio_by_classes": ratios,
               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
