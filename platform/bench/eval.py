"""`ioulab bench eval`: our COCO evaluator against pycocotools, and the paired bootstrap's cost.

A COCO-sized synthetic set by default (5,000 images, 80 categories, about 7 ground-truth boxes
and exactly 100 detections per image: jittered copies of the ground truth plus background boxes).
Rows: pycocotools (evaluate + accumulate, the reference), our evaluator (``cocoeval.evaluate``:
faster-coco-eval's C++ COCOeval) with the largest difference of its ten metrics to pycocotools',
the per-image matching kept as arrays (``cocoeval.match``, once per variant), and a paired
bootstrap of two correlated detection sets (AP…AP90, ``--resamples`` image resamples, both
variants re-accumulated per resample). CPU-only work: wall time by :func:`~ioulab.platform.bench.timing.timed` on the CPU, one run
each (they take seconds to minutes).
"""
from __future__ import annotations

import argparse
import contextlib
import io

import numpy as np

from ioulab.platform.bench.common import BenchResult
from ioulab.platform.bench.timing import timed
from ioulab.platform.smoke import add_smoke_test

BOOTSTRAP_METRICS = ("AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90")
FULL = {"images": 5000, "categories": 80, "resamples": 1000}   # COCO val2017-sized
SMOKE = {"images": 200, "categories": 10, "resamples": 100}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=None, help="default 5000 (--smoke-test: 200)")
    p.add_argument("--categories", type=int, default=None, help="default 80 (--smoke-test: 10)")
    p.add_argument("--dets-per-image", type=int, default=100)
    p.add_argument("--resamples", type=int, default=None, help="default 1000 (--smoke-test: 100)")
    p.add_argument("--seed", type=int, default=0)
    add_smoke_test(p, "200 images, 10 categories, 100 resamples; explicit sizes win", deprecated_smoke=True)
    p.add_argument("--skip-pycocotools", action="store_true",
                   help="do not time pycocotools (its full-size run takes minutes)")


# --------------------------------------------------------------------------------------------
# The synthetic set
# --------------------------------------------------------------------------------------------
def synthetic_eval_set(num_images: int, num_categories: int, dets_per_image: int, seed: int = 0,
                       width: int = 640, height: int = 480) -> tuple[dict, list[dict], list[dict]]:
    """(ground-truth dataset dict, detections A, detections B): B is A with each box moved and
    each score changed a little, so the two variants are correlated image by image like two
    ablation variants of one detector."""
    rng = np.random.default_rng(seed)
    cat_p = 1.0 / np.arange(1, num_categories + 1)   # a few frequent classes, a long tail
    cat_p /= cat_p.sum()
    images = [{"id": i + 1, "width": width, "height": height, "file_name": f"{i + 1}.jpg"}
              for i in range(num_images)]
    anns, det_a, det_b = [], [], []
    for img in images:
        n_gt = int(np.clip(rng.poisson(7), 1, dets_per_image // 2))
        side = np.exp(rng.uniform(np.log(8), np.log(350), (n_gt, 1))) * rng.uniform(0.6, 1.6, (n_gt, 2))
        side = np.minimum(side, [width - 1, height - 1])
        xy = rng.uniform(0, 1, (n_gt, 2)) * ([width, height] - side)
        cats = rng.choice(num_categories, n_gt, p=cat_p) + 1
        crowd = rng.uniform(size=n_gt) < 0.01
        for box_xy, box_wh, c, cr in zip(xy, side, cats, crowd):
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(c),
                         "bbox": [*box_xy.tolist(), *box_wh.tolist()], "area": float(box_wh[0] * box_wh[1]),
                         "iscrowd": int(cr)})
        # detections: 1-2 jittered copies of each box (scores high), then background boxes
        copies = rng.integers(1, 3, n_gt)
        src = np.repeat(np.arange(n_gt), copies)
        n_bg = dets_per_image - len(src)
        box = np.concatenate([np.c_[xy[src], side[src]] * (1 + rng.normal(0, 0.07, (len(src), 4))),
                              np.c_[rng.uniform(0, 1, (n_bg, 2)) * [width, height],
                                    np.exp(rng.uniform(np.log(6), np.log(250), (n_bg, 2)))]])
        box[:, 2:] = np.maximum(box[:, 2:], 1.0)
        label = np.concatenate([cats[src], rng.choice(num_categories, n_bg, p=cat_p) + 1])
        score = np.concatenate([rng.beta(4, 2, len(src)), rng.beta(1, 4, n_bg)])
        box_b = box * (1 + rng.normal(0, 0.03, box.shape))
        score_b = np.clip(score + rng.normal(0, 0.05, len(score)), 0.001, 1.0)
        for dets, bx, sc in ((det_a, box, score), (det_b, box_b, score_b)):
            dets += [{"image_id": img["id"], "category_id": int(c), "bbox": b.tolist(), "score": float(s)}
                     for b, c, s in zip(bx, label, sc)]
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c + 1, "name": f"class{c + 1}"} for c in range(num_categories)]}
    return gt, det_a, det_b


# --------------------------------------------------------------------------------------------
# Timed steps
# --------------------------------------------------------------------------------------------
def pycocotools_metrics(gt: dict, dets: list[dict]) -> dict[str, float]:
    """The ten metrics as pycocotools computes them (COCOeval evaluate + accumulate + summarize)."""
    from ioulab.detector.engine.cocoeval import THRESHOLD_OF_METRIC, pycocotools_eval

    ev = pycocotools_eval(gt, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    out = {"AP": ev.stats[0], "APs": ev.stats[3], "APm": ev.stats[4], "APl": ev.stats[5]}
    for key, t in THRESHOLD_OF_METRIC.items():
        p = ev.eval["precision"][t, :, :, 0, -1]
        p = p[p > -1]
        out[key] = float(p.mean()) if p.size else -1.0
    return {k: 100.0 * v if v >= 0 else 0.0 for k, v in out.items()}


def _timed(fn):
    with timed("cpu") as watch:
        value = fn()
    return value, watch.seconds


def run(args) -> BenchResult:
    from ioulab.detector.engine import cocoeval
    from ioulab.detector.engine.bootstrap import paired_bootstrap

    sizes = SMOKE if args.smoke_test else FULL
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    gt, det_a, det_b = synthetic_eval_set(args.images, args.categories, args.dets_per_image, args.seed)
    title = (f"COCO evaluation: {args.images} images, {args.categories} categories, "
             f"{args.dets_per_image} detections per image ({len(det_a)} detections)")
    rows = []
    metrics, t_ours = _timed(lambda: cocoeval.evaluate(gt, det_a))
    ours_row = {"step": "ours: COCO evaluation (faster-coco-eval C++)", "seconds": t_ours, "AP": metrics["AP"]}
    if not args.skip_pycocotools:
        ref, t_ref = _timed(lambda: pycocotools_metrics(gt, det_a))
        rows.append({"step": "pycocotools COCOeval", "seconds": t_ref, "AP": ref["AP"], "speed-up": 1.0,
                     "max |Δ| vs pycocotools": 0.0})
        ours_row.update({"speed-up": t_ref / t_ours,
                         "max |Δ| vs pycocotools": float(max(abs(metrics[k] - ref[k]) for k in cocoeval.METRIC_KEYS))})
    rows.append(ours_row)
    match_a, t_match = _timed(lambda: cocoeval.match(gt, det_a))
    match_b, t_match_b = _timed(lambda: cocoeval.match(gt, det_b))
    rows.append({"step": "per-image matching kept as arrays (area all), per variant", "seconds": t_match})
    result, t_boot = _timed(lambda: paired_bootstrap(match_a, match_b, metrics=BOOTSTRAP_METRICS,
                                                     resamples=args.resamples, seed=args.seed))
    ap = result["AP"]
    rows.append({"step": f"paired bootstrap: {args.resamples} resamples x 2 variants of AP…AP90",
                 "seconds": t_boot, "AP": f"ΔAP {ap.delta:+.2f} [{ap.low:+.2f}, {ap.high:+.2f}]"})
    extra = {"pycocotools_equal": None if args.skip_pycocotools else bool(ours_row["max |Δ| vs pycocotools"] < 1e-6),
             "bootstrap_seconds": t_boot, "match_seconds": [t_match, t_match_b]}
    notes = ["the machine's CPU cores may be shared with other work: figures are one run's wall time",
             "the bootstrap matches each variant once and re-accumulates every resample with image "
             "weights (numpy); the ΔAP interval is the paired 95 % percentile interval"]
    return BenchResult(title, ["step", "seconds", "speed-up", "AP", "max |Δ| vs pycocotools"], rows, notes,
                       extra)
