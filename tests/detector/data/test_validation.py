"""A dataset is validated when it is opened: each problem is one line naming the file."""
import json

import numpy as np
import pytest
from PIL import Image

from ioulab.detector.data.coco import CocoDetection, DataError, MissingDataError

from .conftest import write_coco

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def images(n=6, size=(24, 16)):
    return [{"id": i + 1, "file_name": f"{i + 1:03d}.png", "width": size[0], "height": size[1]}
            for i in range(n)]


def annotations(n=6):
    return [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [1, 2, 8, 6], "iscrowd": 0}
            for i in range(n)]


def open_error(files, kind=DataError) -> str:
    with pytest.raises(kind) as err:
        CocoDetection(*files, train=False)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_valid_file_opens(tmp_path):
    ds = CocoDetection(*write_coco(tmp_path, images(), annotations(), CATEGORIES), train=False)
    assert len(ds) == 6 and ds.num_classes == 2


def test_malformed_json_names_file_line_and_column(tmp_path):
    ann, img = write_coco(tmp_path, images(), annotations(), CATEGORIES)
    text = json.dumps(json.loads(ann.read_text()), indent=1)
    ann.write_text(text.replace('"width": 24,', '"width": 24', 1))  # a missing comma
    message = open_error((ann, img))
    line = next(i for i, l in enumerate(text.splitlines(), 1) if '"width": 24,' in l) + 1
    assert message.startswith(f"{ann}: not valid JSON: line {line} column ")
    assert "Expecting ',' delimiter" in message


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.update(images=[]), "no images (an empty split cannot be trained or evaluated)"),
    (lambda d: d.update(annotations=[]), "no annotations"),
    (lambda d: d.update(categories=[]), "no categories"),
    (lambda d: d.pop("images"), "'images' must be a list, got NoneType"),
    (lambda d: d["images"][2].update(id=1), "1 image id(s) used more than once: 1 (ids must be unique)"),
    (lambda d: d["annotations"][3].update(id=1), "1 annotation id(s) used more than once: 1"),
    (lambda d: d["categories"][1].update(id=1), "1 category id(s) used more than once: 1"),
    (lambda d: d["images"][0].update(width=0), "every image needs an integer id, a file_name and positive"),
    (lambda d: d["annotations"][0].update(category_id=9),
     "annotation id 1 (image id 1) has category_id 9, which is not among the file's categories [1, 2]"),
    (lambda d: d["annotations"][0].update(image_id=99), "annotation id 1 (image id 99) refers to an image id"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, -3, 4]),
     "annotation id 2 has bbox [1, 2, -3, 4] with a negative width or height"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, float("nan"), 4]),
     "annotation id 2 has bbox [1, 2, nan, 4]; expected [x, y, width, height] of 4 finite numbers"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, float("inf"), 4]), "annotation id 2 has bbox"),
])
def test_annotation_file_problems(tmp_path, change, needle):
    ann, img = write_coco(tmp_path, images(), annotations(), CATEGORIES)
    data = json.loads(ann.read_text())
    change(data)
    ann.write_text(json.dumps(data))
    message = open_error((ann, img))
    assert message.startswith(f"{ann}: ") and needle in message


def test_missing_annotation_file_and_image_folder(tmp_path):
    ann, img = write_coco(tmp_path, images(), annotations(), CATEGORIES)
    assert open_error((tmp_path / "nope.json", img), MissingDataError) == \
        f"{tmp_path / 'nope.json'}: annotation file does not exist"
    message = open_error((ann, tmp_path / "nope"), MissingDataError)
    assert message == f"{tmp_path / 'nope'}: image folder of {ann} does not exist"


def test_missing_images_are_listed_first_few_and_counted(tmp_path):
    ann, img = write_coco(tmp_path, images(), annotations(), CATEGORIES)
    for name in ("002.png", "003.png", "005.png", "006.png"):
        (img / name).unlink()
    message = open_error((ann, img), MissingDataError)
    assert message == f"{img}: 4 of 6 images of ann.json are missing: 002.png, 003.png, 005.png, ..."


def test_truncated_and_unreadable_images_are_found_up_front(tmp_path):
    ann, img = write_coco(tmp_path, images(), annotations(), CATEGORIES)
    data = (img / "002.png").read_bytes()
    (img / "002.png").write_bytes(data[: len(data) // 2])
    (img / "004.png").write_text("not an image")
    message = open_error((ann, img))
    assert message.startswith(f"{img}: 2 of 6 images of ann.json are unusable: 002.png is truncated "
                              "(no PNG end marker), 004.png is not a readable image (cannot identify")


def test_truncated_jpeg_is_found_up_front(tmp_path):
    ann, img = write_coco(tmp_path, images(2), annotations(2), CATEGORIES)
    data = json.loads(ann.read_text())
    for info in data["images"]:
        info["file_name"] = info["file_name"].replace(".png", ".jpg")
        rng = np.random.default_rng(info["id"])
        Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(img / info["file_name"])
    ann.write_text(json.dumps(data))
    assert len(CocoDetection(ann, img, train=False)) == 2
    full = (img / "002.jpg").read_bytes()
    (img / "002.jpg").write_bytes(full[:-40])
    assert "002.jpg is truncated (no JPEG end marker)" in open_error((ann, img))


def test_damage_only_decoding_finds_names_the_file_at_load_time(tmp_path):
    ann, img = write_coco(tmp_path, images(), annotations(), CATEGORIES)
    ds = CocoDetection(ann, img, train=False)
    path = img / "003.png"
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start:start + 20] = bytes(20)  # compressed pixels destroyed, header and IEND intact
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        ds[2]
    assert str(err.value).startswith(f"{path}: cannot decode the image (image id 3 of {ann})")


def test_a_load_time_error_in_a_worker_stays_one_line(tmp_path):
    from ioulab.detector.data.loader import build_eval_loader

    ann, img = write_coco(tmp_path, images(), annotations(), CATEGORIES)
    ds = CocoDetection(ann, img, train=False)
    (img / "001.png").write_text("gone bad after the check")
    with pytest.raises(DataError) as err:
        list(build_eval_loader(ds, batch_size=2, num_workers=1))
    assert str(err.value).startswith(f"{img / '001.png'}: cannot decode the image (image id 1 of {ann})")
    assert "\n" not in str(err.value)
