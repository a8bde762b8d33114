"""Resolve the data config to datasets: explicit COCO paths, a ``root`` folder, or the synthetic
default generated once into the cache. Opening a dataset validates it (``data.coco``): a bad file
fails here, before any training, with a one-line error naming the file."""
from __future__ import annotations

import sys
from pathlib import Path

from ioulab.detector.config import DataConfig
from ioulab.detector.data.coco import CocoDetection, DataError, MissingDataError
from ioulab.detector.data.synth import ensure_synthetic, split_paths

SPLITS = ("train", "val")


def resolve_paths(cfg: DataConfig) -> dict[str, tuple[Path, Path]]:
    """``{"train": (ann_file, img_dir), "val": (ann_file, img_dir)}`` as absolute paths (Ray trials
    run in their own working directory, so relative paths must not survive past here)."""
    explicit = [cfg.train_ann, cfg.train_images, cfg.val_ann, cfg.val_images]
    if any(explicit):
        if not all(explicit):
            raise DataError("data.train_ann, data.train_images, data.val_ann and data.val_images "
                            "must be given together")
        paths = {"train": (cfg.train_ann, cfg.train_images), "val": (cfg.val_ann, cfg.val_images)}
        keys = {split: (f"data.{split}_ann", f"data.{split}_images") for split in SPLITS}
    else:
        if cfg.root and not Path(cfg.root).expanduser().is_dir():
            raise MissingDataError(f"data.root: {cfg.root} does not exist (expected a folder with "
                                   "annotations/{train,val}.json and {train,val}/, see ioulab data synth)")
        root = Path(cfg.root) if cfg.root else ensure_synthetic(
            num_train=cfg.synth.num_train, num_val=cfg.synth.num_val, size=cfg.synth.size, seed=cfg.synth.seed)
        paths = {split: split_paths(root, split) for split in SPLITS}
        keys = {split: ("data.root", "data.root") for split in SPLITS}
    resolved = {k: (Path(a).expanduser().resolve(), Path(i).expanduser().resolve()) for k, (a, i) in paths.items()}
    for split, (ann, img) in resolved.items():
        if not ann.is_file():
            raise MissingDataError(f"{keys[split][0]}: {split} annotation file {ann} does not exist")
        if not img.is_dir():
            raise MissingDataError(f"{keys[split][1]}: {split} image folder {img} does not exist")
    return resolved


def absolutize(cfg: DataConfig) -> DataConfig:
    """Make user-given data paths absolute in place (call in the driver, before trials start)."""
    for key in ("root", "train_ann", "train_images", "val_ann", "val_images"):
        value = getattr(cfg, key)
        if value:
            setattr(cfg, key, str(Path(value).expanduser().resolve()))
    return cfg


def _open(cfg: DataConfig, split: str, ann: Path, img: Path) -> CocoDetection:
    """``train`` flips with ``cfg.flip_prob`` and drops images without boxes if
    ``cfg.filter_empty_train`` (saying how many on stderr); ``val`` is never filtered."""
    if split != "train":
        return CocoDetection(ann, img, train=False)
    dataset = CocoDetection(ann, img, train=True, flip_prob=cfg.flip_prob, filter_empty=cfg.filter_empty_train)
    if dataset.num_empty_dropped:
        print(f"[ioulab] data.filter_empty_train: dropped {dataset.num_empty_dropped} training image(s) "
              f"without a usable box from {ann.name}; {len(dataset)} left", file=sys.stderr)
    return dataset


def build_dataset(cfg: DataConfig, split: str) -> CocoDetection:
    """The validated dataset of one split (see :func:`_open`)."""
    return _open(cfg, split, *resolve_paths(cfg)[split])


def build_datasets(cfg: DataConfig) -> tuple[CocoDetection, CocoDetection]:
    """Both splits, each validated as it is opened (so a broken validation file fails before
    training, not after it)."""
    paths = resolve_paths(cfg)
    return _open(cfg, "train", *paths["train"]), _open(cfg, "val", *paths["val"])
