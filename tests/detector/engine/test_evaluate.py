"""Our metrics equal a direct pycocotools computation on the same detections."""
import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ioulab.detector.engine.evaluate import coco_metrics, to_coco_results


def _gt(tmp_path):
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, 9):
        images.append({"id": i, "file_name": f"{i}.png", "width": 200, "height": 200})
        for _ in range(4):
            x, y = rng.uniform(0, 120, 2)
            w, h = rng.uniform(8, 80, 2)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice([1, 3])),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}))
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path)), anns


def _noisy_detections(anns, seed=1):
    rng = np.random.default_rng(seed)
    dets = []
    for a in anns:
        x, y, w, h = a["bbox"]
        for _ in range(2):
            jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                         "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                         "score": float(rng.uniform(0.05, 1))})
    return dets


def _direct(coco, dets, iou_thrs=None):
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        if iou_thrs is not None:
            ev.params.iouThrs = np.array(iou_thrs)
        ev.evaluate(); ev.accumulate(); ev.summarize()
    return ev.stats


def test_metrics_equal_pycocotools(tmp_path):
    coco, anns = _gt(tmp_path)
    dets = _noisy_detections(anns)
    ours = coco_metrics(coco, dets)
    stats = _direct(coco, dets)
    assert ours["AP"] == pytest.approx(100 * stats[0])
    assert ours["AP50"] == pytest.approx(100 * stats[1])
    assert ours["AP75"] == pytest.approx(100 * stats[2])
    assert ours["APs"] == pytest.approx(100 * max(stats[3], 0))
    assert ours["APm"] == pytest.approx(100 * max(stats[4], 0))
    # AP60…AP90: the same as a COCOeval restricted to that single IoU threshold.
    for key, thr in [("AP60", 0.6), ("AP70", 0.7), ("AP80", 0.8), ("AP90", 0.9)]:
        assert ours[key] == pytest.approx(100 * _direct(coco, dets, [thr])[0]), key
    assert ours["AP50"] > ours["AP70"] > ours["AP90"]


def test_no_detections_scores_zero(tmp_path):
    coco, _ = _gt(tmp_path)
    assert all(v == 0.0 for v in coco_metrics(coco, []).values())


def test_to_coco_results_maps_labels_and_xywh():
    import torch

    out = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([2])}]
    res = to_coco_results(out, [7], [0, 1, 90])
    assert res == [{"image_id": 7, "category_id": 90, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]


def test_evaluation_measures_the_forward_time(tiny_cfg, tmp_path):
    """``time/infer_ms_per_image``: in the metrics and metrics.json, positive; only the forwards after
    the first (warm-up) batch are timed, unless there is one batch."""
    import torch

    from ioulab.detector.data.datasets import build_dataset
    from ioulab.detector.data.loader import build_eval_loader
    from ioulab.detector.engine.evaluate import INFER_MS_PER_IMAGE, ForwardTime, evaluate_model, predict
    from ioulab.detector.model import build_model

    cfg = tiny_cfg("inference.batch_size=2")
    val = build_dataset(cfg.data, "val")
    model = build_model(cfg.model, val.num_classes, cfg.inference)
    labels, cpu = list(val.label_to_cat_id), torch.device("cpu")
    metrics = evaluate_model(model, val, labels, cfg.inference, cpu, out_dir=tmp_path, progress=False)
    assert 0 < metrics[INFER_MS_PER_IMAGE] < 60_000
    assert json.loads((tmp_path / "metrics.json").read_text())[INFER_MS_PER_IMAGE] == metrics[INFER_MS_PER_IMAGE]
    assert len(val) == 6
    for batch_size, timed_images in ((2, 4), (6, 6)):   # 3 batches: the first is warm-up; 1 batch: timed
        forward = ForwardTime()
        predict(model, build_eval_loader(val, batch_size, 0), cpu, labels, progress=False, forward_time=forward)
        assert forward.images == timed_images and forward.seconds > 0
        assert forward.metrics() == {INFER_MS_PER_IMAGE: 1000 * forward.seconds / timed_images}
    assert ForwardTime().metrics() == {}   # nothing timed: no metric (not a 0 or a NaN)
    assert ForwardTime.total([ForwardTime(1.0, 4), ForwardTime(2.0, 2)]) == ForwardTime(3.0, 6)
