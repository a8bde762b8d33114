"""`ioulab bench train`: seconds per training iteration and images/s, every row in one run.

Rows: our ``cpu_tiny`` (or ``--config``) model, one row per value of ``--vary KEY=V1,V2,...``
(e.g. the box loss types), our ``r50_fpn_1x`` model at the same image size, and torchvision's stock
``fasterrcnn_resnet50_fpn`` at the same size. All rows train on the same pre-loaded batches, so the
ratios compare models, not data loading.
"""
from __future__ import annotations

import argparse

import torch

from ioulab.platform.bench.common import BenchResult
from ioulab.platform.bench import timing
from ioulab.platform.smoke import add_smoke_test, smoke_overrides

# The ResNet-50 rows compare with torchvision's stock model built without weights (no download):
# both from scratch, with trainable BatchNorm and every layer trained.
R50_FROM_SCRATCH = ["model.backbone.pretrained=false", "model.backbone.norm=bn", "model.backbone.trainable_layers=5"]
NUM_BATCHES = 8  # distinct batches every timed model cycles through


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
    add_smoke_test(p, "the config at smoke sizes, 2 timed iterations, no ResNet-50 rows")
    p.add_argument("--workers", default=None, metavar="N1,N2,...",
                   help="instead: data-parallel scaling, one row per worker count (DDP, 1 thread per "
                        "worker, the global batch split): s/iter, images/s, efficiency vs ideal "
                        "(platform/bench/train_workers.py)")


class _Stepper:
    """SGD steps of one model on the shared batches; ``timed(n)`` returns the seconds of n steps.
    ``weights``: the loss weights (default: the model's ``loss_weights``, else a plain sum; a
    DDP-wrapped model passes its inner model's)."""

    def __init__(self, model, batches, weights=None):
        self.model, self.batches, self.i = model, batches, 0
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        self.weights = weights if weights is not None else getattr(model, "loss_weights", None)
        model.train()

    def timed(self, n: int) -> float:
        with timing.timed(next(self.model.parameters()).device) as t:
            self._steps(n)
        return t.seconds

    def _steps(self, n: int) -> None:
        for _ in range(n):
            images, targets = self.batches[self.i % len(self.batches)]
            self.i += 1
            out = self.model(images, targets)
            loss = sum(out[k] * w for k, w in self.weights.items()) if self.weights else sum(out.values())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


def _seconds_per_step(steppers: list[_Stepper], warmup: int, iters: int, rounds: int = 4) -> list[float]:
    """Mean seconds per step of each model, the models interleaved in ``rounds`` rounds so that a
    change of machine load during the run affects every row alike (ratios of a few % stay honest)."""
    for s in steppers:
        s.timed(warmup)
    total = [0.0] * len(steppers)
    counts = [0] * len(steppers)
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    for n in per_round:
        for j, s in enumerate(steppers):
            total[j] += s.timed(n)
            counts[j] += n
    return [t / max(c, 1) for t, c in zip(total, counts)]


def bench_batches(cfg, rank: int = 0, world: int = 1) -> tuple[list, int]:
    """The first NUM_BATCHES batches of ``cfg``'s training stream (seed 0; with ``world`` > 1, rank
    ``rank``'s part of each global batch, as the trainer splits it) and the number of classes."""
    from ioulab.detector.data.datasets import build_datasets
    from ioulab.detector.data.loader import InfiniteLoader

    train_set, _ = build_datasets(cfg.data)
    stream = InfiniteLoader(train_set, cfg.train.batch_size, 0, seed=0, rank=rank, world_size=world).iter_from(0)
    return [next(stream) for _ in range(NUM_BATCHES)], train_set.num_classes


def seeded_stepper(cfg, num_classes: int, batches, wrap=None) -> _Stepper:
    """A :class:`_Stepper` of ``cfg``'s model built after ``seed_everything(0)`` (the same initial
    weights in every row and every rank), wrapped by ``wrap`` (e.g. DDP) when given."""
    from ioulab.detector.engine.runtime import seed_everything
    from ioulab.detector.model import build_model

    seed_everything(0)
    model = build_model(cfg.model, num_classes, cfg.inference)
    return _Stepper(wrap(model) if wrap is not None else model, batches, weights=model.loss_weights)


def run(args) -> BenchResult:
    if args.workers:
        from ioulab.platform.bench import train_workers

        return train_workers.run(args)
    from ioulab.detector import config as C

    if args.smoke_test:
        args.iters, args.warmup, args.no_r50 = 2, 1, True
    base = C.load_config(args.config, smoke_overrides(args))
    batches, k = bench_batches(base)
    batch = base.train.batch_size

    variants = _variants(args, base)
    steppers = [seeded_stepper(cfg, k, batches) for _, cfg in variants]
    seconds = _seconds_per_step(steppers, args.warmup, args.iters)
    rows = [{"model": name, "s/iter": sec, "images/s": batch / sec, "ratio": sec / seconds[0]}
            for (name, _), sec in zip(variants, seconds)]
    notes = [f"batch {batch}, images {base.model.min_size}px, {torch.get_num_threads()} threads, "
             f"{args.iters} timed iterations (ResNet-50 rows: {args.r50_iters}) after {args.warmup} warmup; "
             f"rows interleaved in rounds"]
    if not args.no_r50:
        rows += _r50_rows(base, k, batches, args.r50_iters)
        for row in rows[:len(variants)]:
            row["vs stock r50"] = row["s/iter"] / rows[-1]["s/iter"]
        notes.append("ratio: against the first row; for the ResNet-50 rows, ours / torchvision's stock model "
                     "at the same image size; vs stock r50: this row's s/iter / the stock model's")
    return BenchResult("training speed (CPU)" if not torch.cuda.is_available() else "training speed",
                       ["model", "s/iter", "images/s", "ratio"] + (["vs stock r50"] if not args.no_r50 else []),
                       rows, notes)


def _variants(args, base) -> list[tuple[str, object]]:
    """(row name, config) per timed model: the config, or one per value of ``--vary KEY=V1,V2``."""
    from ioulab.detector import config as C

    name = f"ours {args.config or C.DEFAULT_PRESET}"
    if not args.vary:
        return [(name, base)]
    key, values = args.vary.split("=", 1)
    return [(f"{name} {key}={value}", C.apply_overrides(C.clone(base), [f"{key}={value}"]))
            for value in values.split(",")]


def _r50_rows(base, k: int, batches, iters: int) -> list[dict]:
    """Our r50_fpn_1x (from scratch) and torchvision's stock Faster R-CNN at ``base``'s image size,
    interleaved: two rows, the stock model's last."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from ioulab.detector import config as C
    from ioulab.detector.engine.runtime import seed_everything

    size = base.model.min_size
    batch = base.train.batch_size
    r50 = C.load_config("r50_fpn_1x", [f"model.min_size={size}", f"model.max_size={base.model.max_size}",
                                       *R50_FROM_SCRATCH])
    ours = seeded_stepper(r50, k, batches)
    seed_everything(0)
    stock = _Stepper(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=k + 1,
                                             min_size=size, max_size=base.model.max_size), batches)
    r50_sec, tv = _seconds_per_step([ours, stock], 1, iters, rounds=min(iters, 3))
    return [{"model": "ours r50_fpn_1x (from scratch)", "s/iter": r50_sec, "images/s": batch / r50_sec,
             "ratio": r50_sec / tv},
            {"model": "torchvision fasterrcnn_resnet50_fpn", "s/iter": tv, "images/s": batch / tv, "ratio": 1.0}]
