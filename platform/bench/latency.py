"""`ioulab bench latency --checkpoint CKPT`: the papers' inference-speed table for one trained model.

Rows (batch 1, the checkpoint's validation split, every row measured in the same run, interleaved
image by image so that machine load affects all rows alike):

    baseline                  Faster R-CNN path: the IoU branch removed (or --baseline-checkpoint)
    IoU head off              inference.mode=baseline (IoU head present, unused)
    + IoU-NMS                 inference.mode=iou_nms
    IoU computed, regular NMS inference.mode=iou_regular_nms
    + refine                  inference.mode=refine

    + refine, autograd        the same with inference.refine.impl=autograd (the reference
                              implementation; only when the checkpoint's impl is another one)

Latency is the median wall time of ``model([image])`` (transform → backbone → RPN → heads →
postprocess); AP comes from the detections of the same timed calls.

Floors (:mod:`floors`), per image, on the boxes of an untimed refine-mode call of the same image:
``overhead_ms`` is the median over images of a row's latency minus its reference row's (+ IoU-NMS:
IoU head off; the refine rows: + IoU-NMS), ``floor_ms`` the median of the stage's floor,
``over_floor`` their ratio; ``ops_per_step`` the operators per refinement step of that row's
implementation (torch.profiler, on the first ``--ops-images`` images).
"""
from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import dataclass, field

import torch

from ioulab.platform.bench.common import BenchResult
from ioulab.platform.bench.floors import Recorder, count_ops, nms_floor, refine_floor
from ioulab.platform.bench.timing import timed
from ioulab.platform.smoke import add_smoke_test, smoke_overrides

ROWS = [("IoU head off", "baseline"), ("+ IoU-NMS", "iou_nms"),
        ("IoU computed, regular NMS", "iou_regular_nms"), ("+ refine", "refine")]
REFERENCE_ROW = "+ refine, autograd"


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
    p.add_argument("--ops-images", type=int, default=5,
                   help="images on which the operators per refinement step are counted")
    add_smoke_test(p, "2 images of a tiny synthetic validation set, 1 warmup, operators counted on 1")


@dataclass
class Series:
    """What the timed loop collects, one entry per measured image (warmup calls removed)."""

    times: dict[str, list[float]]        # row → seconds of ``model([image])``
    outputs: dict[str, list[dict]]       # row → the detections of those calls
    floors: dict[str, list[float]] = field(default_factory=lambda: {"+ IoU-NMS": [], "+ refine": []})
    steps: list[int] = field(default_factory=list)      # refinement steps per image
    ops: dict[str, list[int]] = field(default_factory=dict)  # refine impl → operators per image

    def drop_last(self) -> None:
        """Forget the last image (a warmup call)."""
        for series in (*self.times.values(), *self.outputs.values(), *self.floors.values(), self.steps):
            series.pop()


def _load_models(args):
    """(the IoUNet, its config, its checkpoint info, device, the baseline model, its info): the
    baseline is ``--baseline-checkpoint`` or the same weights with the IoU branch removed."""
    from ioulab.detector.engine.evaluate import load_trained

    overrides = smoke_overrides(args, data_only=True)
    model, cfg, info, device = load_trained(args.checkpoint, overrides)
    if model.roi_heads.iou_predictor is None:
        raise SystemExit(f"{args.checkpoint} has no IoU head (model.iou_head.enabled=false)")
    if args.baseline_checkpoint:
        base_model, _, base_info, _ = load_trained(args.baseline_checkpoint)
    else:
        base_model, base_info = load_trained(args.checkpoint, overrides)[0], info
        base_model.roi_heads.iou_predictor = None  # the plain Faster R-CNN path
        base_model.roi_heads.postprocess = None
    return model, cfg, info, device, base_model, base_info


def _row_settings(cfg) -> dict:
    """Row name → the inference config of that row (the modes, and the autograd reference)."""
    from ioulab.detector import config as C

    rows_spec = [(name, {"inference.mode": mode}) for name, mode in ROWS]
    if cfg.inference.refine.impl != "autograd":
        rows_spec.append((REFERENCE_ROW, {"inference.mode": "refine", "inference.refine.impl": "autograd"}))
    return {name: C.apply_overrides(C.clone(cfg), o).inference for name, o in rows_spec}


def _measure_floors(model, inference, image, series: Series, device, count: bool) -> None:
    """The floors of IoU-NMS and refinement on the boxes of an untimed refine-mode call of
    ``image``; with ``count``, also the operators per refinement of each implementation."""
    from ioulab.detector.model import configure_inference

    heads = model.roi_heads
    configure_inference(model, inference)
    post = heads.postprocess
    heads.postprocess = recorder = Recorder(post)
    with torch.no_grad():
        model([image])
        heads.postprocess = post
        candidates, features, shapes = recorder.inputs
        kept = post.nms.keep(heads, candidates, features, shapes)
        trace: list = []
        post.refine(heads, kept, features, shapes, trace)
        series.floors["+ IoU-NMS"].append(nms_floor(heads, candidates, features, shapes, post.nms, device))
        series.floors["+ refine"].append(refine_floor(heads, features, shapes, kept, trace, device))
        series.steps.append(len(trace) - 1)
        for name in series.ops if count else ():
            variant = copy.copy(post)
            variant.impl = name
            series.ops[name].append(count_ops(lambda: variant.refine(heads, kept, features, shapes)))


def _measure(args, model, base_model, inference: dict, images: list, device, impl: str) -> Series:
    """Every row on every image, interleaved image by image (the first ``--warmup`` images run
    twice, the first time unmeasured)."""
    from ioulab.detector.model import configure_inference

    names = ["baseline", *inference]
    series = Series({k: [] for k in names}, {k: [] for k in names}, ops={"autograd": [], impl: []})

    def run_timed(name: str, m, image) -> None:
        with timed(device) as t, torch.no_grad():
            out = m([image])[0]
        series.times[name].append(t.seconds)
        series.outputs[name].append(out)

    for i, (image, _) in enumerate(images[: args.warmup] + images):
        run_timed("baseline", base_model, image)
        for name, settings in inference.items():
            configure_inference(model, settings)
            run_timed(name, model, image)
        _measure_floors(model, inference["+ refine"], image, series, device,
                        count=args.warmup <= i < args.warmup + args.ops_images)
        if i < args.warmup:  # warmup calls are not measured
            series.drop_last()
    return series


def _overheads(row: dict, series: Series, impl: str) -> None:
    """A mode row's overhead over its reference row, the stage's floor and ops per step."""
    stage = "+ IoU-NMS" if row["row"] == "+ IoU-NMS" else "+ refine" if row["row"].startswith("+ refine") else None
    if stage is None:
        return
    before = "IoU head off" if stage == "+ IoU-NMS" else "+ IoU-NMS"
    row["overhead_ms"] = 1000 * statistics.median(a - b for a, b in zip(series.times[row["row"]], series.times[before]))
    row["floor_ms"] = 1000 * statistics.median(series.floors[stage])
    row["over_floor"] = row["overhead_ms"] / row["floor_ms"] if row["floor_ms"] > 0 else float("nan")
    counted = series.ops["autograd" if row["row"] == REFERENCE_ROW else impl]
    steps_counted = sum(series.steps[: len(counted)])
    if stage == "+ refine" and steps_counted:
        row["ops_per_step"] = sum(counted) / steps_counted


def run(args) -> BenchResult:
    from ioulab.detector.data.datasets import build_datasets
    from ioulab.detector.engine.evaluate import coco_metrics, to_coco_results

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke_test:
        args.images, args.warmup, args.ops_images = 2, 1, 1
    model, cfg, info, device, base_model, base_info = _load_models(args)
    _, val_set = build_datasets(cfg.data)
    n = len(val_set) if args.images <= 0 else min(args.images, len(val_set))
    impl = cfg.inference.refine.impl
    inference = _row_settings(cfg)
    images = [(val_set[i][0].to(device), val_set[i][1]["image_id"]) for i in range(n)]
    series = _measure(args, model, base_model, inference, images, device, impl)

    ids = [image_id for _, image_id in images]
    rows = []
    for name in ["baseline", *inference]:
        label_map = base_info["label_to_cat_id"] if name == "baseline" else info["label_to_cat_id"]
        metrics = coco_metrics(val_set.coco, to_coco_results(series.outputs[name], ids, label_map))
        ms = 1000 * statistics.median(series.times[name])
        rows.append({"row": name, "latency_ms": ms, "fps": 1000 / ms, "AP": metrics["AP"],
                     "AP50": metrics["AP50"], "AP80": metrics["AP80"], "AP90": metrics["AP90"]})
    for r in rows:
        r["ratio"] = r["latency_ms"] / rows[0]["latency_ms"]
        _overheads(r, series, impl)
    r = cfg.inference.refine
    notes = [f"{n} validation images, batch 1, {torch.get_num_threads()} threads, device {device}; "
             f"refine λ={r.lam}, T={r.steps}, impl={impl}; median latency",
             f"overhead: latency minus that of IoU head off (+ IoU-NMS) or + IoU-NMS (refine rows), "
             f"median over images; floor: the stage's kernels on its own boxes (ioulab.platform.bench."
             f"floors), median; {statistics.mean(series.steps):.2f} refinement steps per image; ops_per_step "
             f"over the first {min(args.ops_images, n)} images"]
    extra = {"floors_ms": {k: [1000 * v for v in vs] for k, vs in series.floors.items()},
             "refine_steps": series.steps, "ops_per_image": series.ops}
    columns = ["row", "latency_ms", "fps", "AP", "AP50", "AP80", "AP90", "ratio", "overhead_ms", "floor_ms",
               "over_floor", "ops_per_step"]
    return BenchResult("inference speed (IoUNet)", columns, rows, notes, extra)
