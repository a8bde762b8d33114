"""The evaluator equals pycocotools (all ten metrics, 1e-6): on the fixtures, the synthetic bench
set and handmade edge cases; image weights equal evaluating the resampled image set."""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ioulab.detector.engine import cocoeval
from ioulab.platform.bench.eval import pycocotools_metrics, synthetic_eval_set

BACKENDS = ("fast", "pycocotools", "ours")


def _ann(i, image_id, cat, box, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(box),
            "area": float(box[2] * box[3]), "iscrowd": crowd}


def _random_set(seed, num_images=25, with_crowd=True, round_scores=True):
    """Random boxes of all sizes (small/medium/large), crowd boxes, a category with detections
    but no ground truth (5), images with neither, tied scores."""
    rng = np.random.default_rng(seed)
    gt = {"images": [{"id": i, "width": 300, "height": 300} for i in range(1, num_images + 1)],
          "categories": [{"id": c} for c in (1, 2, 5)], "annotations": []}
    for i in range(1, num_images - 2):
        for _ in range(rng.integers(0, 8)):
            box = [*rng.uniform(0, 150, 2), *rng.uniform(3, 140, 2)]
            crowd = int(with_crowd and rng.uniform() < 0.1)
            gt["annotations"].append(_ann(len(gt["annotations"]) + 1, i, int(rng.choice([1, 2])), box, crowd))
    dets = []
    for a in gt["annotations"]:
        for _ in range(rng.integers(0, 4)):
            box = np.array(a["bbox"]) * (1 + rng.normal(0, 0.1, 4))
            cat = a["category_id"] if rng.uniform() < 0.9 else 5
            dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": box.tolist(),
                         "score": float(rng.uniform())})
    for i in range(1, num_images):
        for _ in range(rng.integers(0, 5)):
            dets.append({"image_id": i, "category_id": int(rng.choice([1, 2, 5])),
                         "bbox": [*rng.uniform(0, 150, 2), *rng.uniform(2, 60, 2)], "score": float(rng.uniform())})
    if round_scores:
        for d in dets:
            d["score"] = round(d["score"], 1)
    return gt, dets


def _check(gt, dets, backend):
    ref = pycocotools_metrics(gt, dets)
    ours = cocoeval.evaluate(gt, [dict(d) for d in dets], backend=backend)
    assert set(ours) == set(cocoeval.METRIC_KEYS)
    for key in cocoeval.METRIC_KEYS:
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    return ours


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_sets_with_crowd_ties_and_empty_images(seed, backend):
    _check(*_random_set(seed), backend)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
def test_synthetic_bench_set(backend):
    gt, det_a, _ = synthetic_eval_set(60, 12, 100, seed=3)
    metrics = _check(gt, det_a, backend)
    assert 0 < metrics["AP"] < 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_area_range_without_ground_truth_scores_zero(backend):
    """Only large boxes: APs and APm are COCOeval's -1, reported as 0."""
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1}],
          "annotations": [_ann(1, 1, 1, [0, 0, 200, 200]), _ann(2, 2, 1, [10, 10, 150, 120])]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 200, 196], "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.8}]
    ours = _check(gt, dets, backend)
    assert ours["APs"] == 0.0 and ours["APm"] == 0.0 and ours["APl"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_category_without_detections_and_crowd_only_image(backend):
    gt = {"images": [{"id": 1}, {"id": 2}, {"id": 3}], "categories": [{"id": 1}, {"id": 2}],
          "annotations": [_ann(1, 1, 1, [0, 0, 50, 50]), _ann(2, 1, 2, [60, 60, 30, 30]),
                          _ann(3, 2, 1, [0, 0, 100, 100], crowd=1), _ann(4, 2, 1, [120, 120, 40, 40])]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 50, 48], "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.95},   # on the crowd box
            {"image_id": 2, "category_id": 1, "bbox": [121, 118, 40, 44], "score": 0.5},
            {"image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.7}]      # empty image
    ours = _check(gt, dets, backend)
    assert 0 < ours["AP50"] < 100   # category 2 has ground truth and no detection: AP 0 pulls the mean down


def test_no_detections_scores_zero():
    gt, _ = _random_set(0)
    assert cocoeval.evaluate(gt, []) == {k: 0.0 for k in cocoeval.METRIC_KEYS}
    acc = cocoeval.Accumulator(cocoeval.match(gt, []))
    assert all(float(v[0]) == 0.0 for v in acc().values())


def test_more_than_100_detections_per_image_and_category():
    rng = np.random.default_rng(5)
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1}],
          "annotations": [_ann(i + 1, 1 + i % 2, 1, [*rng.uniform(0, 200, 2), 30, 30]) for i in range(20)]}
    dets = [{"image_id": 1 + i % 2, "category_id": 1, "bbox": [*rng.uniform(0, 200, 2), 30, 30],
             "score": float(rng.uniform())} for i in range(300)]
    for backend in BACKENDS:
        _check(gt, dets, backend)


def _expanded(gt, dets, counts):
    """The dataset with image i repeated counts[i] times (new image ids)."""
    images, anns, out = [], [], []
    ids = sorted(img["id"] for img in gt["images"])
    new_id = 0
    for i, image_id in enumerate(ids):
        for _ in range(counts[i]):
            new_id += 1
            images.append({"id": new_id})
            anns += [{**a, "id": len(anns) + 1 + j, "image_id": new_id}
                     for j, a in enumerate(x for x in gt["annotations"] if x["image_id"] == image_id)]
            out += [{**d, "image_id": new_id} for d in dets if d["image_id"] == image_id]
    for j, a in enumerate(anns):
        a["id"] = j + 1
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [0, 1])
def test_image_weights_equal_evaluating_the_resampled_images(seed):
    gt, dets = _random_set(seed, round_scores=False)   # distinct scores: the order is unambiguous
    matches = cocoeval.match(gt, [dict(d) for d in dets], areas=cocoeval.AREA_NAMES)
    counts = np.random.default_rng(seed).multinomial(len(gt["images"]), np.full(len(gt["images"]), 1 / len(gt["images"])))
    weighted = cocoeval.Accumulator(matches)(counts[None, :])
    ref = pycocotools_metrics(*_expanded(gt, dets, counts))
    for key in cocoeval.METRIC_KEYS:
        assert float(weighted[key][0]) == pytest.approx(ref[key], abs=1e-6), key


def test_matches_save_load_roundtrip(tmp_path):
    gt, dets = _random_set(1)
    m = cocoeval.match(gt, dets, areas=cocoeval.AREA_NAMES)
    m.save(tmp_path / "m.npz")
    back = cocoeval.Matches.load(tmp_path / "m.npz")
    assert back.image_ids == m.image_ids and back.category_ids == m.category_ids and back.gt_digest == m.gt_digest
    for a, b in zip(m.areas, back.areas):
        for name in ("category", "image", "score", "tp", "ignored", "num_gt"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert cocoeval.Accumulator(back)()["AP"][0] == cocoeval.Accumulator(m)()["AP"][0]


def test_area_not_matched_is_refused():
    gt, dets = _random_set(0)
    with pytest.raises(ValueError, match="small"):
        cocoeval.Accumulator(cocoeval.match(gt, dets), metrics=("APs",))


def test_metrics_from_precision_reads_cocoeval():
    gt, dets = _random_set(2)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    m = cocoeval.metrics_from_precision(ev.eval["precision"])
    assert m["AP"] == pytest.approx(100 * ev.stats[0]) and m["AP75"] == pytest.approx(100 * ev.stats[2])


def test_detections_are_left_untouched():
    gt, dets = _random_set(0)
    before = [dict(d) for d in dets]
    for backend in BACKENDS:
        cocoeval.evaluate(gt, dets, backend=backend)
    cocoeval.match(gt, dets)
    assert dets == before


def test_recall_threshold_counting_is_exact():
    r = np.clip(np.r_[cocoeval.RECALL_THRESHOLDS, np.nextafter(cocoeval.RECALL_THRESHOLDS, -1),
                      np.nextafter(cocoeval.RECALL_THRESHOLDS, 2), np.arange(1001) / 1000, 7 / 100, 29 / 100,
                      np.random.default_rng(0).uniform(size=10000)], 0, 1)
    np.testing.assert_array_equal(cocoeval.thresholds_reached(r),
                                  np.searchsorted(cocoeval.RECALL_THRESHOLDS, r, side="right"))
