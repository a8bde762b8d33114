"""One handmade MLflow store (SQLite in a temp dir) with three sweeps and a plain train run,
shared by the report tests (creating an MLflow database costs seconds)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tests.platform.report.store import SweepStore, ap

LOSS = "model.roi_heads.box_loss.type"
IOU_LOSS = "model.iou_head.loss.type"
LAM = "inference.refine.lam"
NMS, BETA = "inference.nms.type", "inference.nms.beta"

LATENCY = {"title": "Inference latency, batch 1", "columns": ["row", "latency_ms", "fps", "AP", "ratio"],
           "rows": [{"row": "Faster R-CNN", "latency_ms": 50.0, "fps": 20.0, "AP": 37.6, "ratio": 1.0},
                    {"row": "+ IoU-NMS + refine", "latency_ms": 84.8, "fps": 11.79, "AP": 39.3,
                     "ratio": 1.696}],
           "notes": ["refinement alone costs 22.6 ms"]}

# λ sweep: AP of each trained model at each λ (both peak at λ = 2).
LAMBDA_AP = {"smooth_l1": {0.5: 38.7, 1.0: 39.0, 2.0: 39.3, 4.0: 38.9},
             "bce": {0.5: 39.0, 1.0: 39.4, 2.0: 39.6, 4.0: 39.1}}


def _lam_metrics(a):
    return ap(a, a + 20.0, a + 15.0, a + 8.0, a - 4.0, a - 22.0)


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    st = SweepStore(tmp_path_factory.mktemp("mlflow"))
    ids = {}

    # 1. Box-loss ablation: two seeds per loss (averaged), one failed and one stopped trial.
    p = ids["losses"] = st.parent("losses", [LOSS, "train.seed"], {LOSS: "smooth_l1"})
    losses = [("t0", "smooth_l1", 0, ap(37.0, 58.0, 54.0, 46.5, 33.0, 11.0)),
              ("t1", "smooth_l1", 1, ap(38.0, 58.8, 54.2, 46.7, 33.4, 11.4)),
              ("t2", "giou", 0, ap(38.6, 57.5, 53.0, 47.0, 36.8, 17.4)),
              ("t3", "giou", 1, ap(39.0, 57.7, 53.4, 47.0, 37.2, 17.6)),
              ("t4", "ciou", 0, ap(38.2, 58.0, 53.9, 46.9, 35.0, 15.0)),
              ("t5", "ciou", 1, None), ("t6", "diou", 0, {"AP": 20.0})]
    status = {"t5": "FAILED", "t6": "STOPPED"}
    for name, loss, seed, metrics in losses:
        ids[name] = st.trial(p, "losses", name, {LOSS: loss, "train.seed": seed}, metrics,
                             status=status.get(name, "FINISHED"))

    # 2. λ sweep: train two models once, evaluate each at four λ; one eval trial failed.
    p = ids["lambda"] = st.parent("lambda", [IOU_LOSS, LAM], {IOU_LOSS: "smooth_l1", LAM: 0.5})
    for model, aps in LAMBDA_AP.items():
        # The train trial's own metrics (default inference) must not enter the table.
        train = st.trial(p, "lambda", f"train-{model}", {IOU_LOSS: model}, _lam_metrics(aps[0.5] - 5.0))
        for lam, a in aps.items():
            st.trial(p, "lambda", f"eval-{model}-{lam}", {IOU_LOSS: model, LAM: lam}, _lam_metrics(a),
                     stage="eval", train_run_id=train)
        if model == "bce":
            st.trial(p, "lambda", "eval-bce-8.0", {IOU_LOSS: model, LAM: 8.0}, None, status="FAILED",
                     stage="eval", train_run_id=train)

    # 3. NMS sweep on one trained model, with the latency bench's JSON as a parent artifact.
    p = ids["nms"] = st.parent("nms", [NMS, BETA], {NMS: "greedy", BETA: 1.0})
    train = st.trial(p, "nms", "train", {}, ap(38.2, 58.0, 54.0, 47.0, 33.0, 12.0, AP75=41.0))
    for i, (kind, beta, a, a75) in enumerate([("greedy", 1.0, 38.2, 41.0), ("diou", 1.0, 38.5, 41.5),
                                              ("diou", 0.9, 38.6, 41.9)]):
        st.trial(p, "nms", f"eval-{i}", {NMS: kind, BETA: beta},
                 ap(a, 58.0, 54.0, 47.0, 33.0, 12.0, AP75=a75), stage="eval", train_run_id=train)
    lat = st.artifacts.parent / "latency.json"
    lat.write_text(json.dumps(LATENCY))
    st.client.log_artifact(p, str(lat))

    # 4. A sweep run twice under one name (the newest is reported), and a sweep with no trial yet.
    for i, a in enumerate((30.0, 31.0)):
        p = ids[f"rerun{i}"] = st.parent("rerun", [LOSS], {})
        st.trial(p, "rerun", f"r{i}", {LOSS: "giou"}, ap(a, 50.0, 45.0, 40.0, 30.0, 10.0))
    ids["empty"] = st.parent("empty", [LOSS], {LOSS: "giou"})

    # 5. A plain `ioulab train` run in another experiment.
    ids["single"] = st.single_run("ioulab", {LOSS: "ciou"}, ap(38.4, 58.1, 54.0, 47.1, 35.2, 15.1))
    return SimpleNamespace(uri=st.uri, client=st.client, ids=ids, root=st.artifacts.parent)


@pytest.fixture(scope="session")
def ci_store(tmp_path_factory):
    """A sweep whose trials logged their per-image matching (eval_matches.npz), three seeds per
    box loss: giou is smooth_l1 with its scores shuffled a little (no real difference), ciou sees
    the ground truth on half of the images (clearly better)."""
    from tests.platform.report.store import matched_variants

    st = SweepStore(tmp_path_factory.mktemp("mlflow_ci"))
    p = st.parent("ci", [LOSS, "train.seed"], {LOSS: "smooth_l1"})
    ids = {"parent": p}
    for loss, seeds in matched_variants(tmp_path_factory.mktemp("matches")).items():
        for seed, (metrics, path) in enumerate(seeds):
            rid = ids[f"{loss}{seed}"] = st.trial(p, "ci", f"{loss}-{seed}", {LOSS: loss, "train.seed": seed}, metrics)
            st.client.log_artifact(rid, str(path))
    return SimpleNamespace(uri=st.uri, client=st.client, ids=ids)
