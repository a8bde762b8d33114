"""`ioulab data synth`: write the deterministic synthetic COCO-format dataset."""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="dataset folder (new, empty, or a previous synthetic dataset)")
    p.add_argument("--train", type=int, default=512, help="training images")
    p.add_argument("--val", type=int, default=128, help="validation images")
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ioulab.detector.data.synth import generate_synthetic, split_paths

    root = generate_synthetic(args.out, num_train=args.train, num_val=args.val, size=args.size,
                              seed=args.seed, progress=not args.no_progress)
    for split in ("train", "val"):
        ann, images = split_paths(root, split)
        data = json.loads(ann.read_text())
        print(f"{split}: {len(data['images'])} images, {len(data['annotations'])} boxes -> {ann}, {images}/")
    return 0
