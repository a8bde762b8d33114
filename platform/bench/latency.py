"""`ioulab bench latency --checkpoint CKPT`: the papers' inference-speed table for one trained model.

Rows (batch 1, the checkpoint's validation split, every row measured in the same run, interleaved
image by image so that machine load affects all rows alike):

    baseline                  Faster R-CNN path: the IoU branch removed (or --baseline-checkpoint)
    IoU head off              inference.mode=baseline (IoU head present, unused)
    + IoU-NMS                 inference.mode=iou_nms
    IoU computed, regular NMS inference.mode=iou_regular_nms
    + refine                  inference.mode=refine

Latency is the median wall time of ``model([image])`` (transform → backbone → RPN → heads →
postprocess); AP comes from the detections of the same timed calls.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from ioulab.platform.bench.common import BenchResult
from ioulab.platform.bench.timing import timed

ROWS = [("IoU head off", "baseline"), ("+ IoU-NMS", "iou_nms"),
        ("IoU computed, regular NMS", "iou_regular_nms"), ("+ refine", "refine")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="an IoUNet checkpoint (model.iou_head.enabled)")
    p.add_argument("--baseline-checkpoint", default=None,
                   help="a plain Faster R-CNN checkpoint for the baseline row (default: the same "
                        "weights with the IoU branch removed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="test-time overrides for every row (e.g. inference.refine.lam=2.0)")
    p.add_argument("--images", type=int, default=0, help="use the first N validation images (0: all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")


def run(args) -> BenchResult:
    from ioulab.detector import config as C
    from ioulab.detector.engine.datasets import build_datasets
    from ioulab.detector.engine.evaluate import coco_metrics, load_trained, to_coco_results
    from ioulab.detector.model import configure_inference

    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, info, device = load_trained(args.checkpoint, args.overrides)
    if model.roi_heads.iou_predictor is None:
        raise SystemExit(f"{args.checkpoint} has no IoU head (model.iou_head.enabled=false)")
    if args.baseline_checkpoint:
        base_model, _, base_info, _ = load_trained(args.baseline_checkpoint)
    else:
        base_model, base_info = load_trained(args.checkpoint, args.overrides)[0], info
        base_model.roi_heads.iou_predictor = None  # the plain Faster R-CNN path
        base_model.roi_heads.postprocess = None
    _, val_set = build_datasets(cfg.data)
    n = len(val_set) if args.images <= 0 else min(args.images, len(val_set))
    inference = {mode: C.apply_overrides(C.clone(cfg), {"inference.mode": mode}).inference for _, mode in ROWS}

    names = ["baseline"] + [name for name, _ in ROWS]
    times: dict[str, list[float]] = {k: [] for k in names}
    outputs: dict[str, list[dict]] = {k: [] for k in names}

    def run_timed(name: str, m, image) -> None:
        with timed(device) as t, torch.no_grad():
            out = m([image])[0]
        times[name].append(t.seconds)
        outputs[name].append(out)

    images = [(val_set[i][0].to(device), val_set[i][1]["image_id"]) for i in range(n)]
    for i, (image, _) in enumerate(images[: args.warmup] + images):
        run_timed("baseline", base_model, image)
        for name, mode in ROWS:
            configure_inference(model, inference[mode])
            run_timed(name, model, image)
        if i < args.warmup:  # warmup calls are not measured
            for k in names:
                times[k].pop()
                outputs[k].pop()

    ids = [image_id for _, image_id in images]
    rows = []
    for name in names:
        label_map = base_info["label_to_cat_id"] if name == "baseline" else info["label_to_cat_id"]
        metrics = coco_metrics(val_set.coco, to_coco_results(outputs[name], ids, label_map))
        ms = 1000 * statistics.median(times[name])
        rows.append({"row": name, "latency_ms": ms, "fps": 1000 / ms, "AP": metrics["AP"],
                     "AP50": metrics["AP50"], "AP80": metrics["AP80"], "AP90": metrics["AP90"]})
    for r in rows:
        r["ratio"] = r["latency_ms"] / rows[0]["latency_ms"]
    r = cfg.inference.refine
    notes = [f"{n} validation images, batch 1, {torch.get_num_threads()} threads, device {device}; "
             f"refine λ={r.lam}, T={r.steps}; median latency"]
    return BenchResult("inference speed (IoUNet)", ["row", "latency_ms", "fps", "AP", "AP50", "AP80", "AP90", "ratio"],
                       rows, notes)
