import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ioulab.detector.data.synth import ensure_synthetic, generate_synthetic, split_paths


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_byte_identical(tmp_path):
    a = generate_synthetic(tmp_path / "a", num_train=5, num_val=3, size=64, seed=7, progress=False)
    b = generate_synthetic(tmp_path / "b", num_train=5, num_val=3, size=64, seed=7, progress=False)
    assert _files(a) == _files(b)
    c = generate_synthetic(tmp_path / "c", num_train=5, num_val=3, size=64, seed=8, progress=False)
    assert _files(a) != _files(c)


def test_valid_coco_with_tight_boxes(synth_root):
    from ioulab.detector.data.synth import render_sample

    ann, img_dir = split_paths(synth_root, "val")
    coco = COCO(str(ann))
    data = json.loads(ann.read_text())
    assert len(coco.getCatIds()) == 5 and len(data["images"]) == 6
    overlapping = 0
    for index, img in enumerate(data["images"]):
        pixels = np.asarray(Image.open(img_dir / img["file_name"]).convert("RGB"))
        image, objects = render_sample(0, "val", index, 96)
        assert np.array_equal(pixels, image)  # the PNG is the rendered image
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert [a["bbox"] for a in anns] == [o["bbox"] for o in objects]
        for a, o in zip(anns, objects):
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"] and w > 0 and h > 0
            ys, xs = np.nonzero(o["mask"])
            # tight: the shape touches all four sides of its box, and nothing of it lies outside
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            # the visible part carries the object's flat colour
            assert (pixels[o["mask"]] == np.asarray(o["color"], dtype=np.uint8)).all(axis=1).mean() >= 0.6
        masks = [o["mask"] for o in objects]
        overlapping += sum(int((masks[i] & masks[j]).any()) for i in range(len(masks)) for j in range(i))
    assert overlapping > 0  # objects do overlap


def test_ensure_synthetic_reuses_cache(tmp_path):
    first = ensure_synthetic(cache_root=tmp_path, num_train=3, num_val=2, size=48, progress=False)
    stamp = (first / "annotations" / "train.json").stat().st_mtime_ns
    again = ensure_synthetic(cache_root=tmp_path, num_train=3, num_val=2, size=48, progress=False)
    assert again == first and (first / "annotations" / "train.json").stat().st_mtime_ns == stamp


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_synthetic(tmp_path / "mine", num_train=1, num_val=1, size=32, progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
