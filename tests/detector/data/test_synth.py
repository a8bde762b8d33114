import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from ioulab.detector.data import synth
from ioulab.detector.data.coco import CocoDetection
from ioulab.detector.data.synth import (CLASSES, MARKER, ensure_synthetic, generate_synthetic,
                                        render_sample, split_paths)

SMALL = {"num_train": 6, "num_val": 3, "size": 128, "seed": 1, "progress": False}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _iou(a, b):
    iw = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return iw * ih / (a[2] * a[3] + b[2] * b[3] - iw * ih)


def test_generation_is_byte_identical_for_the_same_arguments(tmp_path):
    a = _files(generate_synthetic(tmp_path / "a", **SMALL))
    b = _files(generate_synthetic(tmp_path / "b", **SMALL))
    assert a == b
    assert {"annotations/train.json", "annotations/val.json", MARKER} <= set(a)
    assert sum(k.startswith("train/") and k.endswith(".png") for k in a) == 6
    assert sum(k.startswith("val/") and k.endswith(".png") for k in a) == 3
    other = _files(generate_synthetic(tmp_path / "c", **{**SMALL, "seed": 2}))
    assert other["annotations/train.json"] != a["annotations/train.json"]


def test_output_is_valid_coco(tmp_path):
    root = generate_synthetic(tmp_path / "d", **SMALL)
    for split, n in (("train", 6), ("val", 3)):
        ann_file, img_dir = split_paths(root, split)
        assert ann_file == root / "annotations" / f"{split}.json" and img_dir == root / split
        coco = COCO(str(ann_file))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
        assert {"info", "licenses"} <= set(coco.dataset)
        assert len(coco.imgs) == n
        for img in coco.imgs.values():
            with Image.open(img_dir / img["file_name"]) as pil:
                assert pil.size == (img["width"], img["height"]) == (128, 128)
                assert pil.mode == "RGB"
            anns = coco.imgToAnns[img["id"]]
            assert 2 <= len(anns) <= 7
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
                assert ann["iscrowd"] == 0 and 0 < ann["area"] <= w * h
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no degenerate boxes
            ds = CocoDetection(ann_file, img_dir, train=False)
        assert ds.num_classes == 5 and len(ds) == n


def test_boxes_are_tight_around_the_shape_pixels(tmp_path):
    root = generate_synthetic(tmp_path / "e", **SMALL)
    ann_file, img_dir = split_paths(root, "train")
    coco = json.loads(ann_file.read_text())
    for index, info in enumerate(coco["images"]):
        image, objects = render_sample(SMALL["seed"], "train", index, 128)
        png = np.asarray(Image.open(img_dir / info["file_name"]))
        assert np.array_equal(png, image)
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        assert [a["bbox"] for a in anns] == [o["bbox"] for o in objects]
        for k, obj in enumerate(objects):
            ys, xs = np.nonzero(obj["mask"])
            x, y, w, h = obj["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert obj["area"] == len(xs)
            # Visible part (not covered by later objects) has the object's colour exactly.
            covered = np.zeros_like(obj["mask"])
            for later in objects[k + 1:]:
                covered |= later["mask"]
            visible = obj["mask"] & ~covered
            assert visible.sum() >= 0.7 * obj["area"]
            assert (png[visible] == obj["color"]).all()
        # Independent of the renderer's masks: the topmost object's colour, found in the PNG
        # near its box, spans exactly the annotated box.
        top = anns[-1]
        x, y, w, h = top["bbox"]
        y0, x0 = max(y - 3, 0), max(x - 3, 0)
        window = png[y0:y + h + 3, x0:x + w + 3]
        ys, xs = np.nonzero((window == objects[-1]["color"]).all(axis=-1))
        assert (xs.min() + x0, ys.min() + y0, xs.max() + 1 + x0, ys.max() + 1 + y0) == \
            (x, y, x + w, y + h)


@pytest.mark.parametrize("size", [32, 256])
def test_other_image_sizes_scale_the_content(size):
    for index in range(5):
        image, objects = render_sample(0, "val", index, size)
        assert image.shape == (size, size, 3) and 2 <= len(objects) <= 7
        for obj in objects:
            x, y, w, h = obj["bbox"]
            assert x + w <= size and y + h <= size
            assert 0.08 * size <= max(w, h) <= 0.6 * size


def test_content_statistics():
    counts, per_image, overlapping, max_iou, sides = np.zeros(5), [], 0, 0.0, []
    for index in range(30):
        _, objects = render_sample(0, "train", index, 128)
        per_image.append(len(objects))
        for i, a in enumerate(objects):
            counts[a["category_id"] - 1] += 1
            sides += a["bbox"][2:]
            for b in objects[i + 1:]:
                iou = _iou(a["bbox"], b["bbox"])
                max_iou = max(max_iou, iou)
                overlapping += 0.1 <= iou <= 0.5
    assert min(per_image) >= 2 and max(per_image) <= 7 and len(set(per_image)) >= 4
    assert counts.min() >= 0.1 * counts.sum()  # all 5 classes well represented
    assert max_iou <= 0.5 and overlapping >= 15  # overlaps that NMS must keep apart
    assert 8 <= min(sides) <= 16 and 50 <= max(sides) <= 80


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an ioulab synthetic dataset"):
        generate_synthetic(foreign, **SMALL)
    assert _files(foreign) == {"notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_replaces_a_previous_synthetic_dataset_and_fills_an_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    generate_synthetic(out, **SMALL)
    generate_synthetic(out, **{**SMALL, "num_train": 2})
    assert len(list((out / "train").glob("*.png"))) == 2
    assert json.loads((out / MARKER).read_text())["params"]["num_train"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no leftovers


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_sample(*args)

    monkeypatch.setattr(synth, "render_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(tmp_path / "out", **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_ensure_synthetic_generates_once_then_reuses(tmp_path, monkeypatch):
    calls = []
    real = synth._write_to_sibling
    monkeypatch.setattr(synth, "_write_to_sibling",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("IOULAB_CACHE", str(tmp_path / "cache"))
    params = {k: v for k, v in SMALL.items() if k != "progress"}
    first = ensure_synthetic(progress=False, **params)
    assert first.parent == tmp_path / "cache" / "synth"
    assert (first / "annotations" / "train.json").is_file()
    before = _files(first)
    second = ensure_synthetic(progress=False, **params)
    assert second == first and calls == [1] and _files(second) == before
    other = ensure_synthetic(cache_root=tmp_path / "elsewhere", progress=False, **params)
    assert other.parent == tmp_path / "elsewhere" / "synth" and calls == [1, 1]
    ensure_synthetic(progress=False, **{**params, "seed": 9})  # other params: another folder
    assert len(calls) == 3 and len(list((tmp_path / "cache" / "synth").iterdir())) == 2


def test_concurrent_ensure_synthetic_calls_agree(tmp_path, monkeypatch):
    # Both callers finish generating before either renames: one rename wins, the other
    # must discard its copy and return the winner's folder.
    barrier = threading.Barrier(2, timeout=30)
    real = synth._write_to_sibling

    def slow(*args, **kwargs):
        tmp = real(*args, **kwargs)
        barrier.wait()
        return tmp

    monkeypatch.setattr(synth, "_write_to_sibling", slow)
    results, errors = [], []

    def call():
        try:
            results.append(ensure_synthetic(cache_root=tmp_path, **SMALL))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    assert [p.name for p in (tmp_path / "synth").iterdir()] == [results[0].name]
    assert (results[0] / MARKER).is_file()
    assert len(list((results[0] / "train").glob("*.png"))) == 6


def test_ensure_synthetic_does_not_adopt_a_foreign_folder(tmp_path):
    key = synth._params_key(num_train=1, num_val=1, size=64, seed=0)
    squatter = tmp_path / "synth" / key
    squatter.mkdir(parents=True)
    (squatter / "junk").write_text("x")
    with pytest.raises(FileExistsError, match="not a finished dataset"):
        ensure_synthetic(cache_root=tmp_path, num_train=1, num_val=1, size=64, progress=False)
    assert [p.name for p in squatter.iterdir()] == ["junk"]
    assert [p.name for p in squatter.parent.iterdir()] == [key]  # our partial copy is gone


def test_ensure_synthetic_rejects_unknown_arguments(tmp_path):
    with pytest.raises(TypeError, match="num_trian"):
        ensure_synthetic(cache_root=tmp_path, num_trian=3)
