"""Where the AP goes (detector/engine/erroranalysis.py): a handmade set with each error type
exactly once, checked against AP values computed by hand; per-class AP equals COCOeval's
per-category precision; the files an evaluation writes."""
import numpy as np
import pytest

from ioulab.detector.engine import erroranalysis
from ioulab.detector.engine.cocoeval import pycocotools_eval

BOX = [10.0, 10.0, 40.0, 40.0]   # xywh, area 1600


def _ann(i, image_id, cat, box):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(box),
            "area": float(box[2] * box[3]), "iscrowd": 0}


def _det(image_id, cat, box, score):
    return {"image_id": image_id, "category_id": cat, "bbox": list(box), "score": score}


def handmade():
    """Six images, categories a (1) and b (2) of one supercategory.

    a: objects in images 1, 2, 3, 5; detections by score: .9 TP (img 1), .8 duplicate of it,
       .7 at IoU .3 with the object of img 3 (loc), .6 far from everything (bkg, img 4),
       .5 TP (img 5).
    b: objects in images 4 (never detected: miss) and 6; detections: .9 TP (img 6), .75 on the
       a-object of img 2 (cls).
    """
    gt = {"images": [{"id": i, "width": 200, "height": 200} for i in range(1, 7)],
          "categories": [{"id": 1, "name": "a", "supercategory": "s"},
                         {"id": 2, "name": "b", "supercategory": "s"}],
          "annotations": [_ann(1, 1, 1, BOX), _ann(2, 2, 1, BOX), _ann(3, 3, 1, BOX),
                          _ann(4, 4, 2, BOX), _ann(5, 5, 1, BOX), _ann(6, 6, 2, BOX)]}
    dets = [_det(1, 1, BOX, 0.9), _det(1, 1, [12.0, 10.0, 40.0, 40.0], 0.8),
            _det(3, 1, [10.0, 10.0, 40.0, 12.0], 0.7), _det(4, 1, [150.0, 150.0, 20.0, 20.0], 0.6),
            _det(5, 1, BOX, 0.5), _det(6, 2, BOX, 0.9), _det(2, 2, BOX, 0.75)]
    return gt, dets


def _pct(recall_points: float, k: int = 2) -> float:
    """(sum over categories of precision x number of recall thresholds) -> mean AP in percent."""
    return 100.0 * recall_points / 101 / k


# By hand (101 recall thresholds 0, .01, ..., 1; a reaches recall .25 at TP 1, .5 at TP 2):
#   base: a = 26 thresholds at precision 1 + 25 at 2/5; b = 51 at 1 (recall .5)
BASE = _pct(26 + 25 * 2 / 5 + 51)
#   dupe or bkg removed: a's second TP at precision 2/4
NO_DUPE = _pct(26 + 25 * 2 / 4 + 51)
#   loc fixed: a = TP FP TP FP TP -> 1 to .25, 2/3 to .5, 3/5 to .75
LOC_FIXED = _pct(26 + 25 * 2 / 3 + 25 * 3 / 5 + 51)
#   cls fixed: the .75 b box becomes an a TP -> a = TP FP TP FP FP TP; b loses a late FP
CLS_FIXED = _pct(26 + 25 * 2 / 3 + 25 * 3 / 6 + 51)
#   miss fixed: b has one object left, found first
MISS_FIXED = _pct(26 + 25 * 2 / 5 + 101)


def test_each_error_type_is_attributed_once():
    gt, dets = handmade()
    result = erroranalysis.analyze(gt, dets)
    assert result.tide_count == {"cls": 1, "loc": 1, "both": 0, "dupe": 1, "bkg": 1, "miss": 1}
    assert result.base_ap50 == pytest.approx(BASE, abs=1e-3)
    expected = {"cls": CLS_FIXED - BASE, "loc": LOC_FIXED - BASE, "both": 0.0,
                "dupe": NO_DUPE - BASE, "bkg": NO_DUPE - BASE, "miss": MISS_FIXED - BASE}
    assert result.tide_delta == pytest.approx(expected, abs=1e-3)


def test_coco_analysis_steps_by_hand():
    gt, dets = handmade()
    coco = erroranalysis.analyze(gt, dets).coco
    # C75 = C50 (the TPs are exact); Loc (IoU .1): the loc box becomes a's TP 2 (as LOC_FIXED);
    # Sim = Oth = Loc: the cls box sits on an a-object and b's curve ends before it anyway;
    # BG: precision 1 up to each class's recall (a .75: 76 thresholds, b .5: 51); FN: 100.
    assert coco == pytest.approx({"C75": BASE, "C50": BASE, "Loc": LOC_FIXED, "Sim": LOC_FIXED,
                                  "Oth": LOC_FIXED, "BG": _pct(76 + 51), "FN": 100.0}, abs=1e-3)


def test_a_box_of_another_supercategory_is_removed_by_oth_not_sim():
    """b's first detection sits on an a-object (cls); a and b in different supercategories:
    Sim keeps it as b's false positive, Oth ignores it."""
    gt, _ = handmade()
    gt["categories"][1]["supercategory"] = "other"
    dets = [_det(2, 2, BOX, 0.95), _det(6, 2, BOX, 0.9), _det(1, 1, BOX, 0.9)]
    coco = erroranalysis.analyze(gt, dets).coco
    a = 26   # a: one of four objects, precision 1
    assert coco["Sim"] == pytest.approx(_pct(a + 51 * 1 / 2), abs=1e-3)   # b: FP then TP -> 1/2
    assert coco["Oth"] == pytest.approx(_pct(a + 51), abs=1e-3)


def test_both_error_and_empty_detections():
    gt, _ = handmade()
    # a b-box at IoU .3 with the a-object of image 1: wrong class and badly placed
    result = erroranalysis.analyze(gt, [_det(1, 2, [10.0, 10.0, 40.0, 12.0], 0.9), _det(6, 2, BOX, 0.8)])
    assert result.tide_count["both"] == 1 and result.tide_count["cls"] == 0
    assert result.tide_delta["both"] > 0
    empty = erroranalysis.analyze(gt, [])
    assert empty.tide_count["miss"] == 6 and empty.class_ap == {"a": 0.0, "b": 0.0}
    assert empty.coco["FN"] == 100.0 and empty.coco["C50"] == 0.0


def test_class_ap_equals_cocoeval_per_category_precision():
    rng = np.random.default_rng(3)
    gt = {"images": [{"id": i, "width": 300, "height": 300} for i in range(1, 16)],
          "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in (1, 2, 7)],
          "annotations": []}
    dets = []
    for i in range(1, 16):
        for _ in range(rng.integers(1, 5)):
            box = [*rng.uniform(0, 150, 2), *rng.uniform(10, 120, 2)]
            cat = int(rng.choice([1, 2]))
            gt["annotations"].append(_ann(len(gt["annotations"]) + 1, i, cat, box))
            for _ in range(rng.integers(0, 3)):
                noisy = (np.array(box) * (1 + rng.normal(0, 0.15, 4))).tolist()
                dets.append(_det(i, int(rng.choice([1, 2, 7])), noisy, float(rng.uniform())))
    result = erroranalysis.analyze(gt, dets)
    p = pycocotools_eval(gt, dets).eval["precision"][:, :, :, 0, -1]   # [T, R, K], pycocotools
    for k, name in enumerate(["c1", "c2"]):
        assert result.class_ap[name] == pytest.approx(100 * p[:, :, k].mean(), abs=1e-3)
        assert result.class_ap75[name] == pytest.approx(100 * p[5, :, k].mean(), abs=1e-3)
    assert result.class_ap["c7"] is None   # no ground truth
    for t, curve in ((0, "0.5"), (8, "0.9")):
        assert result.precision[curve] == pytest.approx(p[t, :, :2].mean(axis=1), abs=1e-4)


def test_files_and_metric_names(tmp_path):
    gt, dets = handmade()
    result = erroranalysis.analyze(gt, dets)
    erroranalysis.write(tmp_path, result)
    assert erroranalysis.ErrorAnalysis.load(tmp_path / erroranalysis.ERRORS_FILE) == result
    assert (tmp_path / erroranalysis.CURVES_FILE).read_bytes()[:4] == b"\x89PNG"
    metrics = result.metrics()
    assert metrics["err/loc"] == result.tide_delta["loc"] and metrics["err/n_miss"] == 1.0
    assert metrics["err/coco_bg"] == result.coco["BG"]
    assert "loc +" in result.summary() and "C75" in result.summary()


def test_metric_prefix_is_the_naming_contracts():
    """The detector names its scalars itself (it never imports the platform); the MLflow naming
    contract (platform/mlflow_names.py) documents the same prefix."""
    from ioulab.platform import mlflow_names

    assert erroranalysis.METRIC_PREFIX == mlflow_names.ERROR_PREFIX
    assert all(mlflow_names.is_error(m) for m in erroranalysis.METRIC_NAMES)
    assert len(set(erroranalysis.METRIC_NAMES)) == 19


# --------------------------------------------------------------------------------------------
# ErrorMatches / ErrorAccumulator: the breakdown under image weights (the report's intervals)
# --------------------------------------------------------------------------------------------
def _random_set(seed: int, num_images: int = 12):
    """Random boxes in two supercategories with noisy, sometimes mislabelled and duplicate
    detections: every error type occurs."""
    rng = np.random.default_rng(seed)
    gt = {"images": [{"id": i, "width": 300, "height": 300} for i in range(1, num_images + 1)],
          "categories": [{"id": 1, "name": "a", "supercategory": "s"}, {"id": 2, "name": "b", "supercategory": "s"},
                         {"id": 3, "name": "c", "supercategory": "t"}],
          "annotations": []}
    dets = []
    for i in range(1, num_images + 1):
        for _ in range(rng.integers(1, 5)):
            box = [*rng.uniform(0, 150, 2), *rng.uniform(10, 120, 2)]
            cat = int(rng.integers(1, 4))
            gt["annotations"].append(_ann(len(gt["annotations"]) + 1, i, cat, box))
            for _ in range(rng.integers(0, 4)):
                noisy = (np.array(box) * (1 + rng.normal(0, 0.2, 4))).tolist()
                label = cat if rng.uniform() < 0.8 else int(rng.integers(1, 4))
                dets.append(_det(i, label, noisy, round(float(rng.uniform()), 4)))
        if rng.uniform() < 0.3:
            dets.append(_det(i, int(rng.integers(1, 4)), [250.0, 250.0, 20.0, 20.0], round(float(rng.uniform()), 4)))
    return gt, dets


def _resampled(gt: dict, dets: list[dict], counts: np.ndarray):
    """The data set with image n (sorted ids) present counts[n] times (copies get new ids)."""
    ids = sorted(img["id"] for img in gt["images"])
    out = dict(gt, images=[], annotations=[])
    new_dets, next_id = [], 1000
    for n, image_id in enumerate(ids):
        for _ in range(int(counts[n])):
            next_id += 1
            out["images"].append({"id": next_id, "width": 300, "height": 300})
            for a in gt["annotations"]:
                if a["image_id"] == image_id:
                    out["annotations"].append(dict(a, id=len(out["annotations"]) + 1, image_id=next_id))
            new_dets += [dict(d, image_id=next_id) for d in dets if d["image_id"] == image_id]
    return out, new_dets


@pytest.mark.parametrize("data", ["handmade", "random"])
def test_error_accumulator_with_unit_weights_gives_the_logged_metrics(data, tmp_path):
    gt, dets = handmade() if data == "handmade" else _random_set(4)
    analysis, matches = erroranalysis.analyze_and_match(gt, dets)
    matches.save(tmp_path / erroranalysis.MATCHES_FILE)
    loaded = erroranalysis.ErrorMatches.load(tmp_path / erroranalysis.MATCHES_FILE)
    values = erroranalysis.ErrorAccumulator(loaded)()
    assert set(values) == set(erroranalysis.METRIC_NAMES)
    for name, logged in analysis.metrics().items():
        assert values[name][0] == pytest.approx(logged, abs=1e-3), name
    if data == "random":
        assert all(analysis.tide_count[k] > 0 for k in ("cls", "loc", "dupe", "bkg", "miss"))


def test_error_accumulator_under_a_resample_equals_analysing_the_resampled_images():
    """Image weights (image 0 three times, image 1 dropped, ...) give what the full analysis of a
    data set with those copies gives: an error's type and fix depend on its own image only."""
    gt, dets = _random_set(7)
    _, matches = erroranalysis.analyze_and_match(gt, dets)
    rng = np.random.default_rng(0)
    weights = rng.multinomial(len(gt["images"]), np.full(len(gt["images"]), 1 / len(gt["images"])), size=3)
    weights[0, :3] = [3, 0, 2]
    got = erroranalysis.ErrorAccumulator(matches)(weights)
    for b, counts in enumerate(weights):
        expected = erroranalysis.analyze(*_resampled(gt, dets, counts)).metrics()
        for name, value in expected.items():
            assert got[name][b] == pytest.approx(value, abs=1e-3), (b, name)


def test_error_accumulator_bg_counts_nothing_for_a_class_without_true_positives():
    """COCO analysis' BG is precision 1 up to the recall Oth reaches; a class whose detections
    are all wrong reaches no recall at all (pycocotools: precision 0 at every threshold)."""
    gt, _ = handmade()
    dets = [_det(1, 1, BOX, 0.9), _det(4, 2, [150.0, 150.0, 20.0, 20.0], 0.8)]   # b: one far box
    analysis, matches = erroranalysis.analyze_and_match(gt, dets)
    assert analysis.coco["BG"] == pytest.approx(_pct(26), abs=1e-3)      # a: recall .25; b: nothing
    assert erroranalysis.ErrorAccumulator(matches)()["err/coco_bg"][0] == pytest.approx(analysis.coco["BG"], abs=1e-3)


def test_no_detections_have_no_error_matches(tmp_path):
    gt, _ = handmade()
    analysis, matches = erroranalysis.analyze_and_match(gt, [])
    assert matches is None and analysis.tide_count["miss"] == 6
    erroranalysis.write(tmp_path, analysis, matches)
    assert not (tmp_path / erroranalysis.MATCHES_FILE).exists()


def test_error_accumulator_rejects_unknown_metrics():
    gt, dets = handmade()
    _, matches = erroranalysis.analyze_and_match(gt, dets)
    with pytest.raises(ValueError, match="not an error-analysis metric"):
        erroranalysis.ErrorAccumulator(matches, ["AP"])


def test_fixing_can_remove_every_detection():
    """Every detection is background: removing the bkg errors leaves no detection at all (AP50 0,
    which pycocotools cannot score from an empty list); the resampled breakdown agrees."""
    gt, _ = handmade()
    dets = [_det(4, 1, [150.0, 150.0, 20.0, 20.0], 0.6), _det(2, 2, [160.0, 10.0, 20.0, 20.0], 0.5)]
    analysis, matches = erroranalysis.analyze_and_match(gt, dets)
    assert analysis.tide_count["bkg"] == 2 and analysis.base_ap50 == 0.0
    assert analysis.tide_delta["bkg"] == 0.0     # 0 detections score no better than 2 wrong ones
    values = erroranalysis.ErrorAccumulator(matches)(np.array([[1, 1, 1, 1, 1, 1], [0, 2, 1, 3, 0, 0]]))
    for name, logged in analysis.metrics().items():
        assert values[name][0] == pytest.approx(logged, abs=1e-3), name
    assert values["err/n_bkg"][1] == 5.0     # image 2 twice, image 4 three times
