"""COCO-format detection dataset: any annotation JSON + image folder, read through pycocotools.

Targets follow torchvision's detection convention (shape letters: N boxes in one image,
K classes, H x W image):
    image   FloatTensor[3, H, W]  RGB in [0, 1]
    boxes   FloatTensor[N, 4]     xyxy in pixels, clipped to the image
    labels  Int64Tensor[N]        contiguous 1..K; 0 is background
    image_id int                  the COCO image id (evaluation maps results back with it)

Validation happens once, at construction, the way a detectron2/mmdetection user expects a bad
file to fail: an annotation naming a category or image that the file does not define raises a
ValueError naming the file, the annotation id and the offending id (silently dropping it would
quietly train on a different label set). Degenerate boxes are common in real data (COCO 2017
train has a few), so those are dropped and counted in one warning instead.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.transforms.functional import pil_to_tensor

# label_to_cat_id[0] stands for background; -1 because 0 is a legal COCO category id.
BACKGROUND_CAT_ID = -1


class CocoDetection(torch.utils.data.Dataset):
    """Images and detection targets of one COCO annotation file.

    Args:
        ann_file: COCO annotation JSON (images, annotations, categories).
        img_dir: folder that the images' `file_name`s are relative to.
        train: if True, a horizontal flip is drawn with probability `flip_prob` per item;
            if False, `dataset[i]` never flips. Crowd boxes are left out of targets either way
            (evaluation reads them from the JSON through pycocotools).
        flip_prob: probability of a horizontal flip when `train` is True.

    Items: `dataset[i]` or `dataset[(i, flip)]`; the explicit flag replaces the random draw, so
    a sampler can decide flips reproducibly (see `loader.InfiniteLoader`).
    """

    def __init__(self, ann_file, img_dir, train: bool, flip_prob: float = 0.5):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.train = bool(train)
        self.flip_prob = float(flip_prob)
        # pycocotools prints progress lines on stdout; keep the trainer's output clean.
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(os.fspath(self.ann_file))

        cat_ids = sorted(self.coco.cats)
        self.label_to_cat_id: list[int] = [BACKGROUND_CAT_ID] + cat_ids
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in cat_ids]
        self.num_classes = len(cat_ids)
        self.ids: list[int] = sorted(self.coco.imgs)

        self._check_references()
        self._targets, dropped, kept = self._build_targets()
        if dropped:
            warnings.warn(
                f"{self.ann_file}: dropped {dropped} degenerate box(es) (width or height <= 0 "
                f"after clipping to the image); {kept} box(es) kept", stacklevel=2)

    def _check_references(self) -> None:
        """Every annotation must name a defined category and image."""
        for ann in self.coco.anns.values():
            where = f"{self.ann_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
            if ann.get("category_id") not in self.cat_id_to_label:
                raise ValueError(
                    f"{where} has category_id {ann.get('category_id')!r}, which is not among the "
                    f"file's categories {sorted(self.cat_id_to_label)}")
            if ann.get("image_id") not in self.coco.imgs:
                raise ValueError(f"{where} refers to an image id that is not in 'images'")

    def _build_targets(self) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
        """Per image: (boxes float32[N,4] xyxy clipped, labels int64[N]); plus dropped/kept counts.

        Done once here, so the degenerate count covers the whole file and `__getitem__` only
        decodes the image.
        """
        targets, dropped, kept = [], 0, 0
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            width, height = float(info["width"]), float(info["height"])
            boxes, labels = [], []
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann.get("iscrowd", 0):
                    continue
                x1, y1, x2, y2 = _clipped_xyxy(ann, width, height, self.ann_file)
                if x2 <= x1 or y2 <= y1:
                    dropped += 1
                    continue
                boxes.append((x1, y1, x2, y2))
                labels.append(self.cat_id_to_label[ann["category_id"]])
            kept += len(boxes)
            targets.append((np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                            np.asarray(labels, dtype=np.int64)))
        return targets, dropped, kept

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key) -> tuple[torch.Tensor, dict]:
        """key: index, or (index, flip). Returns (image [3,H,W] float in [0,1], target dict)."""
        if isinstance(key, tuple):
            index, flip = key
        else:
            index = key
            flip = self.train and self.flip_prob > 0 and bool(torch.rand(()) < self.flip_prob)
        return self.get(int(index), bool(flip))

    def get(self, index: int, flip: bool) -> tuple[torch.Tensor, dict]:
        """Item `index`, horizontally flipped iff `flip`."""
        img_id = self.ids[index]
        image = self._load_image(img_id)
        boxes_np, labels_np = self._targets[index]
        boxes = torch.from_numpy(boxes_np.copy())
        if flip:
            image = image.flip(-1)
            boxes = hflip_boxes(boxes, image.shape[-1])
        target = {"boxes": boxes, "labels": torch.from_numpy(labels_np.copy()), "image_id": img_id}
        return image, target

    def _load_image(self, img_id: int) -> torch.Tensor:
        info = self.coco.imgs[img_id]
        path = self.img_dir / info["file_name"]
        with Image.open(path) as pil:
            rgb = pil.convert("RGB")
        # Boxes were clipped to the JSON's size; a different file size means wrong targets.
        if rgb.size != (info["width"], info["height"]):
            raise ValueError(
                f"{path}: image is {rgb.size[0]}x{rgb.size[1]} but {self.ann_file} says "
                f"{info['width']}x{info['height']} (image id {img_id})")
        return pil_to_tensor(rgb).float().div_(255.0)


def hflip_boxes(boxes: torch.Tensor, width: int | float) -> torch.Tensor:
    """Mirror xyxy boxes [N,4] in an image of `width` pixels: x1' = W - x2, x2' = W - x1."""
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def _clipped_xyxy(ann: dict, width: float, height: float, ann_file) -> tuple[float, ...]:
    """COCO xywh -> xyxy, clipped to [0, width] x [0, height]."""
    bbox = ann.get("bbox")
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        raise ValueError(f"{ann_file}: annotation id {ann.get('id')} has bbox {bbox!r}; "
                         "expected [x, y, width, height] of 4 finite numbers")
    x, y, w, h = (float(v) for v in bbox)
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))
