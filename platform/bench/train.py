"""`ioulab bench train`: seconds per training iteration and images/s, every row in one run.

Rows: our ``cpu_tiny`` (or ``--config``) model, one row per value of ``--vary KEY=V1,V2,...``
(e.g. the box loss types), our ``r50_fpn_1x`` model at the same image size, and torchvision's stock
``fasterrcnn_resnet50_fpn`` at the same size. All rows train on the same pre-loaded batches, so the
ratios compare models, not data loading.
"""
from __future__ import annotations

import argparse
import time

import torch

from ioulab.platform.bench.common import BenchResult


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="config of our model (default: cpu_tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--vary", default=None, metavar="KEY=V1,V2,...",
                   help="one row per value, ratios against the first (e.g. "
                        "model.roi_heads.box_loss.type=smooth_l1,ciou)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per small-model row")
    p.add_argument("--r50-iters", type=int, default=3, help="timed iterations per ResNet-50 row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-r50", action="store_true", help="skip the two ResNet-50 rows")


def _time_steps(model, batches, warmup: int, iters: int) -> float:
    """Median-free mean seconds per SGD step over ``iters`` steps after ``warmup`` steps."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    model.train()

    def step(i: int) -> None:
        images, targets = batches[i % len(batches)]
        out = model(images, targets)
        weights = getattr(model, "loss_weights", None)
        loss = sum(out[k] * w for k, w in weights.items()) if weights else sum(out.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(iters):
        step(warmup + i)
    return (time.perf_counter() - t0) / iters


def run(args) -> BenchResult:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from ioulab.detector import config as C
    from ioulab.detector.data.loader import InfiniteLoader
    from ioulab.detector.engine.datasets import build_datasets
    from ioulab.detector.engine.train import seed_everything
    from ioulab.detector.model import build_model

    base = C.load_config(args.config, args.overrides)
    train_set, _ = build_datasets(base.data)
    k = train_set.num_classes
    batch = base.train.batch_size
    stream = InfiniteLoader(train_set, batch, 0, seed=0).iter_from(0)
    batches = [next(stream) for _ in range(8)]

    variants: list[tuple[str, C.Config]] = []
    if args.vary:
        key, values = args.vary.split("=", 1)
        for value in values.split(","):
            variants.append((f"ours {args.config or C.DEFAULT_PRESET} {key}={value}",
                             C.apply_overrides(C.clone(base), [f"{key}={value}"])))
    else:
        variants.append((f"ours {args.config or C.DEFAULT_PRESET}", base))

    rows = []
    for name, cfg in variants:
        seed_everything(0)
        sec = _time_steps(build_model(cfg.model, k, cfg.inference), batches, args.warmup, args.iters)
        rows.append({"model": name, "s/iter": sec, "images/s": batch / sec, "ratio": sec / (rows[0]["s/iter"] if rows else sec)})
    notes = [f"batch {batch}, images {base.model.min_size}px, {torch.get_num_threads()} threads, "
             f"{args.iters} timed iterations (ResNet-50 rows: {args.r50_iters}) after {args.warmup} warmup"]
    if not args.no_r50:
        size = base.model.min_size
        r50 = C.load_config("r50_fpn_1x", [f"model.min_size={size}", f"model.max_size={base.model.max_size}"])
        seed_everything(0)
        ours = _time_steps(build_model(r50.model, k, r50.inference), batches, 1, args.r50_iters)
        seed_everything(0)
        stock = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=k + 1,
                                        min_size=size, max_size=base.model.max_size)
        tv = _time_steps(stock, batches, 1, args.r50_iters)
        rows.append({"model": "ours r50_fpn_1x", "s/iter": ours, "images/s": batch / ours, "ratio": ours / tv})
        rows.append({"model": "torchvision fasterrcnn_resnet50_fpn", "s/iter": tv, "images/s": batch / tv, "ratio": 1.0})
        notes.append("ratio: against the first row; for the ResNet-50 rows, ours / torchvision's stock model")
    return BenchResult("training speed (CPU)" if not torch.cuda.is_available() else "training speed",
                       ["model", "s/iter", "images/s", "ratio"], rows, notes)
