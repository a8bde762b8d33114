"""COCO-format detection dataset: any annotation JSON + image folder, read through pycocotools.

Targets follow torchvision's detection convention (shape letters: N boxes in one image,
K classes, H x W image):
    image   FloatTensor[3, H, W]  RGB in [0, 1]
    boxes   FloatTensor[N, 4]     xyxy in pixels, clipped to the image
    labels  Int64Tensor[N]        contiguous 1..K; 0 is background
    image_id int                  the COCO image id (evaluation maps results back with it)

Validation happens once, at construction, so that a bad file fails before any training (for both
splits: the trainer opens both first). Every problem raises a one-line :class:`DataError` (or
:class:`MissingDataError`) naming the file: malformed JSON (with JSON's line and column), no images
or no annotations, duplicate image/annotation/category ids (pycocotools would silently keep the
last, pairing one image's labels with another file), an annotation naming an undefined category or
image, a bbox that is not 4 finite numbers or has a negative width/height, missing image files
(the first few and the count), and image files that are unreadable, truncated or of another size
than the JSON says. The image check reads each file's header and its last bytes (a JPEG's EOI
marker, a PNG's IEND chunk) without decoding; whatever only decoding can find is reported, with
the file's path, when the image is loaded. Degenerate boxes (zero width or height, or outside the
image) are common in real data (COCO 2017 train has a few), so those are dropped and counted in one
warning instead.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.transforms.functional import pil_to_tensor

from ioulab.detector.errors import UserError

# label_to_cat_id[0] stands for background; -1 because 0 is a legal COCO category id.
BACKGROUND_CAT_ID = -1
SHOWN = 3  # problems listed by name in one error; the rest are counted


class DataError(UserError, ValueError):
    """A dataset file is invalid; the message names the file.

    A DataLoader worker's error is raised again in the main process as ``DataError("Caught
    DataError in DataLoader worker process N.\\nOriginal Traceback ...")``; of that, only the last
    line, the original one-line message, is kept (a user error, not a bug: no traceback)."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str) and "\nOriginal Traceback" in args[0]:
            args = (args[0].rstrip().splitlines()[-1].split(": ", 1)[-1],)
        super().__init__(*args)


class MissingDataError(UserError, FileNotFoundError):
    """A dataset file or folder does not exist; the message names it."""


def _listed(items: list[str], total: int, what: str) -> str:
    """``"3 of 18 images: a.png, b.png, c.png, ..."``."""
    shown = ", ".join(items[:SHOWN]) + (", ..." if len(items) > SHOWN else "")
    return f"{len(items)} of {total} {what}: {shown}"


def read_annotations(ann_file: Path) -> dict:
    """The COCO JSON of ``ann_file``, with its structure checked (ids unique, lists not empty)."""
    try:
        text = ann_file.read_bytes()
    except FileNotFoundError:
        raise MissingDataError(f"{ann_file}: annotation file does not exist") from None
    except OSError as exc:
        raise DataError(f"{ann_file}: cannot read the annotation file ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # json's messages point at the position ("Unterminated string starting at"): say "here".
        what = exc.msg[: -len(" at")] + " here" if exc.msg.endswith(" at") else exc.msg
        raise DataError(f"{ann_file}: not valid JSON: line {exc.lineno} column {exc.colno}: {what}") from None
    except UnicodeDecodeError:
        raise DataError(f"{ann_file}: not valid JSON (not UTF-8 text)") from None
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{ann_file}: {key!r} must be a list, got {type(data.get(key)).__name__}")
        if not data[key]:
            raise DataError(f"{ann_file}: no {key} (an empty split cannot be trained or evaluated)")
    _check_images_entries(data["images"], ann_file)
    for key, what in (("categories", "category"), ("annotations", "annotation")):
        for item in data[key]:
            if not isinstance(item, dict) or not _is_int(item.get("id")):
                raise DataError(f"{ann_file}: every {what} needs an integer 'id', got {item!r:.120}")
        _check_unique([item["id"] for item in data[key]], f"{what} id", ann_file)
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_images_entries(images: list, ann_file: Path) -> None:
    for info in images:
        if (not isinstance(info, dict) or not _is_int(info.get("id"))
                or not isinstance(info.get("file_name"), str)
                or not all(_is_int(info.get(k)) and info[k] > 0 for k in ("width", "height"))):
            raise DataError(f"{ann_file}: every image needs an integer id, a file_name and positive "
                            f"integer width and height, got {info!r:.160}")
    _check_unique([info["id"] for info in images], "image id", ann_file)


def _check_unique(ids: list[int], what: str, ann_file: Path) -> None:
    seen, repeated = set(), []
    for i in ids:
        if i in seen and i not in repeated:
            repeated.append(i)
        seen.add(i)
    if repeated:
        shown = ", ".join(map(str, repeated[:SHOWN])) + (", ..." if len(repeated) > SHOWN else "")
        raise DataError(f"{ann_file}: {len(repeated)} {what}(s) used more than once: {shown} "
                        "(ids must be unique)")


def image_problem(img_dir: Path, file_name: str, width: int, height: int) -> str | None:
    """What is wrong with an image file, found without decoding it (header and last bytes), as
    ``"<file_name> is ..."``; None if nothing is."""
    path = img_dir / file_name
    try:
        with Image.open(path) as pil:
            size, fmt = pil.size, pil.format
    except FileNotFoundError:
        return f"{file_name} is missing"
    except (OSError, Image.DecompressionBombError) as exc:
        return f"{file_name} is not a readable image ({exc})"
    if size != (width, height):
        return f"{file_name} is {size[0]}x{size[1]}, not {width}x{height}"
    if fmt in END_MARKERS:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 64))
            if END_MARKERS[fmt] not in f.read():
                return f"{file_name} is truncated (no {fmt} end marker)"
    return None


# The bytes a complete file of these formats ends with (up to a few bytes of padding).
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


class CocoDetection(torch.utils.data.Dataset):
    """Images and detection targets of one COCO annotation file.

    Args:
        ann_file: COCO annotation JSON (images, annotations, categories).
        img_dir: folder that the images' `file_name`s are relative to.
        train: if True, a horizontal flip is drawn with probability `flip_prob` per item;
            if False, `dataset[i]` never flips. Crowd boxes are left out of targets either way
            (evaluation reads them from the JSON through pycocotools).
        flip_prob: probability of a horizontal flip when `train` is True.
        filter_empty: drop the images whose target has no box (no annotation, or only crowd or
            degenerate ones), as detectron2 and mmdetection do for training;
            `num_empty_dropped` counts them. Never for evaluation.

    Items: `dataset[i]` or `dataset[(i, flip)]`; the explicit flag replaces the random draw, so
    a sampler can decide flips reproducibly (see `loader.InfiniteLoader`).
    """

    def __init__(self, ann_file, img_dir, train: bool, flip_prob: float = 0.5, filter_empty: bool = False):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.train = bool(train)
        self.flip_prob = float(flip_prob)
        # pycocotools prints progress lines on stdout; keep the trainer's output clean.
        self.coco = COCO()
        self.coco.dataset = read_annotations(self.ann_file)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()

        cat_ids = sorted(self.coco.cats)
        self.label_to_cat_id: list[int] = [BACKGROUND_CAT_ID] + cat_ids
        self.cat_id_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.class_names: list[str] = [str(self.coco.cats[c].get("name", c)) for c in cat_ids]
        self.num_classes = len(cat_ids)
        self.ids: list[int] = sorted(self.coco.imgs)

        self._check_references()
        self._targets, dropped, kept = self._build_targets()
        self.num_empty_dropped = self._drop_empty() if filter_empty else 0
        self._check_image_files()
        if dropped:
            warnings.warn(
                f"{self.ann_file}: dropped {dropped} degenerate box(es) (width or height <= 0 "
                f"after clipping to the image); {kept} box(es) kept", stacklevel=2)

    def _check_references(self) -> None:
        """Every annotation must name a defined category and image."""
        for ann in self.coco.anns.values():
            where = f"{self.ann_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
            if ann.get("category_id") not in self.cat_id_to_label:
                raise DataError(
                    f"{where} has category_id {ann.get('category_id')!r}, which is not among the "
                    f"file's categories {sorted(self.cat_id_to_label)}")
            if ann.get("image_id") not in self.coco.imgs:
                raise DataError(f"{where} refers to an image id that is not in 'images'")

    def _drop_empty(self) -> int:
        """Keep only the images with at least one box in their target; returns how many went."""
        keep = [i for i, (boxes, _) in enumerate(self._targets) if len(boxes)]
        if not keep:
            raise DataError(f"{self.ann_file}: no image has a usable box (all annotations are crowd or "
                            "degenerate): nothing to train on")
        dropped = len(self.ids) - len(keep)
        self.ids = [self.ids[i] for i in keep]
        self._targets = [self._targets[i] for i in keep]
        return dropped

    def _check_image_files(self) -> None:
        """Every listed image exists, opens, is complete and has the JSON's size (no decoding)."""
        if not self.img_dir.is_dir():
            raise MissingDataError(f"{self.img_dir}: image folder of {self.ann_file} does not exist")
        missing, broken = [], []
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            path = self.img_dir / info["file_name"]
            if not path.is_file():
                missing.append(info["file_name"])
            elif (problem := image_problem(self.img_dir, info["file_name"], info["width"],
                                           info["height"])) is not None:
                broken.append(problem)
        of = f"images of {self.ann_file.name}"
        if missing:
            raise MissingDataError(f"{self.img_dir}: {_listed(missing, len(self.ids), of + ' are missing')}")
        if broken:
            raise DataError(f"{self.img_dir}: {_listed(broken, len(self.ids), of + ' are unusable')}")

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
        try:
            with Image.open(path) as pil:
                rgb = pil.convert("RGB")
        except OSError as exc:  # changed since construction, or damage only decoding finds
            raise DataError(f"{path}: cannot decode the image (image id {img_id} of "
                            f"{self.ann_file}): {exc}") from None
        # Boxes were clipped to the JSON's size; a different file size means wrong targets.
        if rgb.size != (info["width"], info["height"]):
            raise DataError(
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
        raise DataError(f"{ann_file}: annotation id {ann.get('id')} has bbox {bbox!r}; "
                        "expected [x, y, width, height] of 4 finite numbers")
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        raise DataError(f"{ann_file}: annotation id {ann.get('id')} has bbox {bbox!r} with a negative "
                        "width or height; COCO boxes are [x, y, width, height]")
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))
