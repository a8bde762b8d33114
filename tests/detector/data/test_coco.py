"""CocoDetection on handmade COCO JSON: crowd, empty image, degenerate/outside boxes, categories."""
import json
import warnings

import pytest
import torch
from PIL import Image

from ioulab.detector.data.coco import CocoDetection
from ioulab.detector.data.loader import build_eval_loader, collate


def _write(tmp_path, annotations, categories=None):
    img_dir = tmp_path / "img"
    img_dir.mkdir(exist_ok=True)
    images = []
    for i, (w, h) in enumerate([(40, 30), (20, 20), (32, 32)], start=1):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(img_dir / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
    cats = categories or [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}, {"id": 90, "name": "c"}]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return ann, img_dir


def _ann(i, image_id, cat, bbox, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": crowd}


ANNS = [
    _ann(1, 1, 7, [2, 3, 10, 5]),          # plain box: xywh -> xyxy
    _ann(2, 1, 90, [30, 20, 20, 20]),      # partly outside a 40x30 image: clipped
    _ann(3, 1, 1, [5, 5, 10, 10], crowd=1),  # crowd: not a training target
    _ann(4, 3, 1, [4, 4, 0, 6]),           # zero width: dropped
    _ann(5, 3, 7, [50, 50, 5, 5]),         # entirely outside: degenerate after clipping
    _ann(6, 3, 90, [1, 2, 3, 4]),
]                                          # image 2 has no annotation at all


def test_targets_labels_and_one_warning(tmp_path):
    ann, img_dir = _write(tmp_path, ANNS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(ann, img_dir, train=False)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "2" in messages[0]  # two degenerate boxes, one warning
    assert ds.num_classes == 3 and ds.class_names == ["a", "b", "c"]
    assert ds.label_to_cat_id[1:] == [1, 7, 90] and ds.cat_id_to_label == {1: 1, 7: 2, 90: 3}
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32 and float(image.max()) <= 1.0
    assert target["image_id"] == 1
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 8.0], [30.0, 20.0, 40.0, 30.0]]))
    assert target["labels"].tolist() == [2, 3]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    _, third = ds[2]
    assert third["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]] and third["labels"].tolist() == [3]


def test_flip_mirrors_boxes(tmp_path):
    ann, img_dir = _write(tmp_path, ANNS)
    ds = CocoDetection(ann, img_dir, train=True, flip_prob=1.0)
    image, target = ds[(0, True)]
    plain, plain_target = ds[(0, False)]
    assert torch.equal(image, plain.flip(-1))
    w = plain.shape[-1]
    expected = plain_target["boxes"].clone()
    expected[:, 0], expected[:, 2] = w - plain_target["boxes"][:, 2], w - plain_target["boxes"][:, 0]
    assert torch.equal(target["boxes"], expected)
    assert torch.equal(ds[0][1]["boxes"], expected)  # flip_prob=1: the random draw always flips
    assert torch.equal(CocoDetection(ann, img_dir, train=False, flip_prob=1.0)[0][1]["boxes"], plain_target["boxes"])


def test_unknown_category_fails_clearly(tmp_path):
    ann, img_dir = _write(tmp_path, ANNS + [_ann(99, 1, 55, [1, 1, 5, 5])])
    with pytest.raises(ValueError, match=r"ann.json.*annotation id 99.*55"):
        CocoDetection(ann, img_dir, train=True)


def test_worker_batches(tmp_path):
    ann, img_dir = _write(tmp_path, ANNS)
    ds = CocoDetection(ann, img_dir, train=False)
    batches = list(build_eval_loader(ds, batch_size=2, num_workers=2))
    assert [len(images) for images, _ in batches] == [2, 1]
    images, targets = batches[0]
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for _, ts in batches for t in ts] == [1, 2, 3]
    images, targets = collate([ds[0], ds[1]])
    assert [i.shape for i in images] == [(3, 30, 40), (3, 20, 20)]
