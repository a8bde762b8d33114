"""What a sweep keeps of each trial's last Tune result (platform/sweep/driver.py ``_records``):
the metrics ``finalize`` logs for a trial that never reached MLflow and the parent's ``best/...``."""
from types import SimpleNamespace

from ioulab.platform.sweep import driver


def _result(metrics: dict) -> SimpleNamespace:
    config = {"ioulab": {"points": [{"index": 0, "label": "mode=refine"}]}, "trial": 0}
    return SimpleNamespace(config=config, metrics=metrics, metrics_dataframe=None, checkpoint=None,
                           error=None, path="/tmp/ray/eval_00000")


def test_records_keep_ap_losses_error_analysis_and_forward_time_not_tune_bookkeeping():
    last = {"AP": 70.5, "AP90": 38.0, "loss/total": 0.4, "err/loc": 1.2, "err/n_dupe": 3.0,
            "err/coco_c75": 80.0, "time/infer_ms_per_image": 24.0, "final": 1, "iteration": 5,
            "time_total_s": 12.0, "trial_seconds": 11.0, "node_id": "abc", "stage": "eval", "done": True}
    (rec,) = driver._records("eval", [_result(last)], plan=None, root="/tmp/ray", values_of=lambda s, p: {})
    assert rec.metrics == {"AP": 70.5, "AP90": 38.0, "loss/total": 0.4, "err/loc": 1.2, "err/n_dupe": 3.0,
                           "err/coco_c75": 80.0, "time/infer_ms_per_image": 24.0}
    assert rec.status == "FINISHED" and rec.seconds == 11.0
