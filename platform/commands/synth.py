"""`ioulab data synth --out DIR`: write the deterministic synthetic COCO-format dataset."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="dataset folder (new, empty, or a previous synthetic dataset)")
    parser.add_argument("--train", type=int, default=512, metavar="N", help="training images")
    parser.add_argument("--val", type=int, default=128, metavar="N", help="validation images")
    parser.add_argument("--size", type=int, default=128, metavar="PX", help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="content seed")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from ioulab.detector.data.synth import generate_synthetic, split_paths

    try:
        root = generate_synthetic(args.out, num_train=args.train, num_val=args.val,
                                  size=args.size, seed=args.seed, progress=not args.no_progress)
    except (FileExistsError, ValueError) as err:  # user errors: a message, not a traceback
        print(f"ioulab data synth: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote synthetic dataset to {root}")
    for split in ("train", "val"):
        ann_file, img_dir = split_paths(root, split)
        coco = json.loads(ann_file.read_text())
        print(f"  {split}: {len(coco['images'])} images, {len(coco['annotations'])} boxes "
              f"-> {ann_file}, {img_dir}/")
    return 0
