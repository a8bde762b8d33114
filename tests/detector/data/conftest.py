"""Helpers shared by the data tests: tiny COCO files written by hand."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_coco(root: Path, images: list[dict], annotations: list[dict],
               categories: list[dict]) -> tuple[Path, Path]:
    """Write `root/ann.json` and one PNG per image (a gradient, so flips are visible).

    images: COCO image dicts; an optional "mode" key ("RGB" or "L") picks the PNG mode.
    Returns (ann_file, img_dir).
    """
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    clean = []
    for info in images:
        w, h = info["width"], info["height"]
        ramp = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
        if info.get("mode", "RGB") == "L":
            pil = Image.fromarray(ramp, mode="L")
        else:
            pil = Image.fromarray(np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 7)], -1))
        pil.save(img_dir / info["file_name"])
        clean.append({k: v for k, v in info.items() if k != "mode"})
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": clean, "annotations": annotations,
                                    "categories": categories}))
    return ann_file, img_dir


@pytest.fixture
def stream_dataset(tmp_path):
    """7 images (ids 101..107), each with one asymmetric box, so a flip changes the box."""
    images = [{"id": 101 + i, "file_name": f"{i}.png", "width": 24, "height": 16}
              for i in range(7)]
    anns = [{"id": i + 1, "image_id": 101 + i, "category_id": 3, "bbox": [i, 2, 5, 6],
             "area": 30, "iscrowd": 0} for i in range(7)]
    return write_coco(tmp_path, images, anns, [{"id": 3, "name": "thing"}])
