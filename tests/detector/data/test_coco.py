import json
import warnings

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from ioulab.detector.data.coco import CocoDetection, DataError, hflip_boxes
from ioulab.detector.data.loader import build_eval_loader

from .conftest import write_coco

# Category ids are non-contiguous and listed out of order: labels follow sorted ids 1, 7, 90.
CATEGORIES = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]
IMAGES = [
    {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
    {"id": 20, "file_name": "empty.png", "width": 16, "height": 16},
    {"id": 5, "file_name": "gray.png", "width": 20, "height": 20, "mode": "L"},
]
ANNOTATIONS = [
    {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
    {"id": 2, "image_id": 10, "category_id": 90, "bbox": [30, 20, 20, 20], "iscrowd": 0},
    {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
    {"id": 4, "image_id": 10, "category_id": 1, "bbox": [5, 5, 0, 4], "iscrowd": 0},
    {"id": 5, "image_id": 5, "category_id": 1, "bbox": [25, 1, 4, 4], "iscrowd": 0},
    {"id": 6, "image_id": 5, "category_id": 1, "bbox": [-3, -2, 8, 6.5], "iscrowd": 0},
]


@pytest.fixture
def coco_files(tmp_path):
    return write_coco(tmp_path, IMAGES, ANNOTATIONS, CATEGORIES)


def _dataset(coco_files, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CocoDetection(*coco_files, **kwargs)


def test_label_mapping_is_contiguous_over_sorted_category_ids(coco_files):
    ds = _dataset(coco_files, train=False)
    assert ds.num_classes == 3
    assert ds.label_to_cat_id[1:] == [1, 7, 90]
    assert ds.cat_id_to_label == {1: 1, 7: 2, 90: 3}
    assert ds.class_names == ["cat", "dog", "zebra"]
    assert ds.ids == [5, 10, 20]
    assert len(ds) == 3


def test_targets_xyxy_clipped_crowd_and_degenerate_excluded(coco_files):
    ds = _dataset(coco_files, train=False)
    image, target = ds[1]  # image id 10
    assert target["image_id"] == 10
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    # ann 1: xywh [2,3,10,5] -> xyxy; ann 2 clipped to the 40x30 image; crowd + zero-width gone.
    assert target["boxes"].tolist() == [[2, 3, 12, 8], [30, 20, 40, 30]]
    assert target["labels"].tolist() == [2, 3]
    _, target = ds[0]  # image id 5: one box fully outside (dropped), one clipped at the origin
    assert target["boxes"].tolist() == [[0, 0, 5, 4.5]]
    assert target["labels"].tolist() == [1]


def test_exactly_one_warning_counting_degenerate_boxes(coco_files):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(*coco_files, train=True)
        for i in range(len(ds)):  # items must not warn again
            ds[i]
    assert len(caught) == 1
    assert "dropped 2 degenerate box(es)" in str(caught[0].message)
    assert "ann.json" in str(caught[0].message)


def test_no_warning_without_degenerate_boxes(tmp_path):
    files = write_coco(tmp_path, IMAGES[:1], ANNOTATIONS[:2], CATEGORIES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(*files, train=False)


def test_image_without_annotations_is_kept(coco_files):
    ds = _dataset(coco_files, train=True, flip_prob=1.0)
    image, target = ds[2]
    assert target["image_id"] == 20 and image.shape == (3, 16, 16)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_image_decoded_as_rgb_in_unit_range(coco_files):
    ds = _dataset(coco_files, train=False)
    gray, _ = ds[0]
    assert gray.shape == (3, 20, 20)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    color, _ = ds[1]
    assert color.min() >= 0 and color.max() <= 1
    assert color[0, 0, -1].item() == 1.0 and color[2, 0, 0].item() == pytest.approx(7 / 255)


def test_flip_mirrors_image_and_boxes(coco_files):
    ds = _dataset(coco_files, train=True, flip_prob=1.0)
    plain, t_plain = ds[(1, False)]
    flipped, t_flip = ds[1]  # flip_prob=1: always flipped
    assert torch.equal(flipped, plain.flip(-1))
    # x1' = W - x2, x2' = W - x1 with W = 40; y unchanged.
    assert t_flip["boxes"].tolist() == [[28, 3, 38, 8], [0, 20, 10, 30]]
    assert torch.equal(t_flip["labels"], t_plain["labels"])
    assert torch.equal(hflip_boxes(t_flip["boxes"], 40), t_plain["boxes"])


def test_flip_probability_and_eval_never_flips(coco_files):
    never = _dataset(coco_files, train=True, flip_prob=0.0)
    evaluation = _dataset(coco_files, train=False, flip_prob=1.0)
    reference = evaluation[(1, False)][1]["boxes"]
    for ds in (never, evaluation):
        for _ in range(5):
            assert torch.equal(ds[1][1]["boxes"], reference)
    torch.manual_seed(0)
    half = _dataset(coco_files, train=True, flip_prob=0.5)
    seen = {tuple(half[1][1]["boxes"][0].tolist()) for _ in range(40)}
    assert seen == {(2.0, 3.0, 12.0, 8.0), (28.0, 3.0, 38.0, 8.0)}


def test_unknown_category_id_raises_naming_file_annotation_and_category(tmp_path):
    bad = ANNOTATIONS + [{"id": 77, "image_id": 10, "category_id": 3, "bbox": [1, 1, 4, 4],
                          "iscrowd": 0}]
    files = write_coco(tmp_path, IMAGES, bad, CATEGORIES)
    with pytest.raises(ValueError, match=r"ann\.json: annotation id 77 .*category_id 3"):
        CocoDetection(*files, train=True)


def test_unknown_image_id_and_malformed_bbox_raise(tmp_path):
    orphan = [{"id": 8, "image_id": 999, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0}]
    files = write_coco(tmp_path / "a", IMAGES, orphan, CATEGORIES)
    with pytest.raises(ValueError, match="annotation id 8 .*not in 'images'"):
        CocoDetection(*files, train=False)
    malformed = [{"id": 9, "image_id": 10, "category_id": 1, "bbox": [1, 1, 4], "iscrowd": 0}]
    files = write_coco(tmp_path / "b", IMAGES, malformed, CATEGORIES)
    with pytest.raises(ValueError, match="annotation id 9 has bbox"):
        CocoDetection(*files, train=False)


def test_image_size_mismatch_with_json_raises(coco_files):
    ann_file, img_dir = coco_files
    ds = _dataset(coco_files, train=False)
    Image.new("RGB", (41, 30)).save(img_dir / "a.png")  # changed after the up-front check
    with pytest.raises(ValueError, match="a.png: image is 41x30 .* says 40x30"):
        ds[1]
    # Found at construction too (the header is read up front).
    with pytest.raises(ValueError, match=r"1 of 3 images of ann.json are unusable: a.png is 41x30, not 40x30"):
        _dataset(coco_files, train=False)


def test_batches_with_two_workers_are_lists(coco_files):
    ds = _dataset(coco_files, train=False)
    batches = list(build_eval_loader(ds, batch_size=2, num_workers=2))
    assert [len(b[0]) for b in batches] == [2, 1]
    images, targets = batches[0]
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for b in batches for t in b[1]] == [5, 10, 20]
    assert images[1].shape == (3, 30, 40) and images[0].shape == (3, 20, 20)
    assert targets[1]["boxes"].tolist() == [[2, 3, 12, 8], [30, 20, 40, 30]]


def test_coco_attribute_is_the_pycocotools_index_and_construction_is_quiet(coco_files, capsys):
    ann_file, _ = coco_files
    ds = _dataset(coco_files, train=False)
    assert isinstance(ds.coco, COCO)
    assert ds.coco.dataset == json.loads(ann_file.read_text())
    assert capsys.readouterr().out == ""  # pycocotools' "loading annotations..." is swallowed


# Image ids 1..5: 1 and 4 have boxes; 2 has no annotation, 3 only a crowd box, 5 only a degenerate one.
FILTER_IMAGES = [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 20} for i in range(1, 6)]
FILTER_ANNOTATIONS = [  # (image id, bbox, iscrowd)
    {"id": k, "image_id": image_id, "category_id": 1, "bbox": bbox, "iscrowd": crowd}
    for k, (image_id, bbox, crowd) in enumerate([(1, [1, 1, 5, 5], 0), (3, [1, 1, 5, 5], 1), (4, [2, 2, 6, 6], 0),
                                                (4, [0, 0, 3, 3], 1), (5, [3, 3, 0, 4], 0)], start=1)]


def test_filter_empty_drops_exactly_the_images_without_a_box(tmp_path):
    files = write_coco(tmp_path, FILTER_IMAGES, FILTER_ANNOTATIONS, [{"id": 1, "name": "cat"}])
    kept = _dataset(files, train=True, filter_empty=True)
    assert kept.ids == [1, 4] and len(kept) == 2 and kept.num_empty_dropped == 3
    assert [kept.get(i, False)[1]["image_id"] for i in range(2)] == [1, 4]  # targets follow their images
    assert kept.get(1, False)[1]["boxes"].tolist() == [[2, 2, 8, 8]]
    assert kept.num_classes == 1 and kept.label_to_cat_id == [-1, 1]  # categories unchanged
    everything = _dataset(files, train=True)  # the default keeps every image
    assert everything.ids == [1, 2, 3, 4, 5] and everything.num_empty_dropped == 0


def test_filter_empty_does_not_need_the_dropped_images_and_refuses_an_empty_result(tmp_path):
    files = write_coco(tmp_path, FILTER_IMAGES, FILTER_ANNOTATIONS, [{"id": 1, "name": "cat"}])
    (files[1] / "2.png").unlink()  # never read once dropped
    assert _dataset(files, train=True, filter_empty=True).ids == [1, 4]
    crowd_only = write_coco(tmp_path / "crowd", FILTER_IMAGES[2:3], FILTER_ANNOTATIONS[1:2],
                            [{"id": 1, "name": "cat"}])
    with pytest.raises(DataError, match=r"crowd/ann.json: no image has a usable box"):
        _dataset(crowd_only, train=True, filter_empty=True)
