"""Resolve the data config to datasets: explicit COCO paths, a ``root`` folder, or the synthetic
default generated once into the cache."""
from __future__ import annotations

from pathlib import Path

from ioulab.detector.config import DataConfig
from ioulab.detector.data.coco import CocoDetection
from ioulab.detector.data.synth import ensure_synthetic, split_paths


def resolve_paths(cfg: DataConfig) -> dict[str, tuple[Path, Path]]:
    """``{"train": (ann_file, img_dir), "val": (ann_file, img_dir)}`` as absolute paths (Ray trials
    run in their own working directory, so relative paths must not survive past here)."""
    explicit = [cfg.train_ann, cfg.train_images, cfg.val_ann, cfg.val_images]
    if any(explicit):
        if not all(explicit):
            raise ValueError("data.train_ann, data.train_images, data.val_ann and data.val_images "
                             "must be given together")
        paths = {"train": (cfg.train_ann, cfg.train_images), "val": (cfg.val_ann, cfg.val_images)}
    else:
        root = Path(cfg.root) if cfg.root else ensure_synthetic(
            num_train=cfg.synth.num_train, num_val=cfg.synth.num_val, size=cfg.synth.size, seed=cfg.synth.seed)
        paths = {split: split_paths(root, split) for split in ("train", "val")}
    resolved = {k: (Path(a).expanduser().resolve(), Path(i).expanduser().resolve()) for k, (a, i) in paths.items()}
    for split, (ann, img) in resolved.items():
        if not ann.is_file():
            raise FileNotFoundError(f"{split} annotation file {ann} does not exist")
        if not img.is_dir():
            raise FileNotFoundError(f"{split} image folder {img} does not exist")
    return resolved


def absolutize(cfg: DataConfig) -> DataConfig:
    """Make user-given data paths absolute in place (call in the driver, before trials start)."""
    for key in ("root", "train_ann", "train_images", "val_ann", "val_images"):
        value = getattr(cfg, key)
        if value:
            setattr(cfg, key, str(Path(value).expanduser().resolve()))
    return cfg


def build_datasets(cfg: DataConfig) -> tuple[CocoDetection, CocoDetection]:
    paths = resolve_paths(cfg)
    train = CocoDetection(*paths["train"], train=True, flip_prob=cfg.flip_prob)
    val = CocoDetection(*paths["val"], train=False)
    return train, val
