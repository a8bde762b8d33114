"""``--smoke-test``: the one flag every long command (``train``, ``eval``, ``sweep``, every ``bench``)
takes, with one meaning: tiny sizes, fast enough for CI, the result marked ``SMOKE TEST``. It checks
that the command runs end to end; its figures mean nothing.

What "tiny" is depends on the command: a config command (train, eval, sweep, bench train/sweep)
adds :data:`SMOKE_OVERRIDES` before the user's ``--set`` (which still win); a bench of synthetic
tensors shrinks its own sizes (``bench prroi``, ``bench nms``, ``bench eval``, ``bench latency``).
"""
from __future__ import annotations

import argparse

MARK = "SMOKE TEST"

# The synthetic dataset of tests/conftest.py and a model small enough for seconds-long steps; the
# model's kind (IoU head, losses, RoI pooling, inference mode) stays the config's.
SMOKE_DATA = [
    "data.root=", "data.train_ann=", "data.train_images=", "data.val_ann=", "data.val_images=",
    "data.synth.num_train=12", "data.synth.num_val=6", "data.synth.size=96", "data.num_workers=0",
]
SMOKE_OVERRIDES = [
    *SMOKE_DATA,
    "model.backbone.name=tiny", "model.backbone.pretrained=false", "model.backbone.norm=bn",
    "model.backbone.trainable_layers=5", "model.backbone.tiny_widths=[8,16,16,16]",
    "model.backbone.fpn_channels=16", "model.min_size=96", "model.max_size=96",
    "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=64",
    "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=32",
    "model.roi_heads.batch_size_per_image=32", "model.roi_heads.representation_size=64",
    "train.batch_size=2", "train.max_iters=4", "train.warmup_iters=2", "train.log_period=1",
    "train.checkpoint_period=2", "train.eval_period=0", "train.device=cpu", "inference.batch_size=3",
]


def add_smoke_test(parser: argparse.ArgumentParser, tiny: str, deprecated_smoke: bool = False) -> None:
    """Add ``--smoke-test`` (``args.smoke_test``); ``tiny`` says what it shrinks. With
    ``deprecated_smoke``, the command's former ``--smoke`` stays a hidden alias."""
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"tiny sizes for CI ({tiny}); the result is marked {MARK}, its figures mean nothing")
    if deprecated_smoke:
        parser.add_argument("--smoke", dest="smoke_test", action="store_true", help=argparse.SUPPRESS)


def smoke_overrides(args, overrides: list[str] | None = None, data_only: bool = False) -> list[str]:
    """The ``--set`` list of a config command: with ``--smoke-test`` the smoke settings first (the
    user's own ``--set`` still wins), else the user's unchanged."""
    overrides = list(overrides if overrides is not None else args.overrides)
    if not getattr(args, "smoke_test", False):
        return overrides
    return [*(SMOKE_DATA if data_only else SMOKE_OVERRIDES), *overrides]


def announce(args, command: str) -> None:
    """One line before a smoke test's work, so its output cannot pass for a real result."""
    if getattr(args, "smoke_test", False):
        print(f"[ioulab] {MARK}: {command} at tiny sizes; its figures mean nothing", flush=True)
