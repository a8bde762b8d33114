"""The results table's training-cost columns (platform/report/cost.py): an evaluation variant
costs the training of the model it evaluates; GPU-hours appear only where a GPU was used."""
from ioulab.platform.report.cost import attach_cost
from ioulab.platform.report.render import results_rows
from ioulab.platform.report.runs import Trial
from ioulab.platform.report.table import Variant, results_table


def _trial(run_id, stage, metrics, train_run_id=None):
    tags = {"ioulab.train_run_id": train_run_id} if train_run_id else {}
    return Trial(run_id, run_id, "FINISHED", "FINISHED", stage, {}, metrics, tags)


def test_cost_columns_by_hand():
    train_a = _trial("ta", "train", {"AP": 30.0, "cost/wall_seconds": 7200.0, "cost/cpu_hours": 4.0,
                                     "cost/gpu_hours": 0.0})
    train_b = _trial("tb", "train", {"AP": 31.0, "cost/wall_seconds": 3600.0, "cost/cpu_hours": 2.0,
                                     "cost/gpu_hours": 0.0})
    old = _trial("old", "train", {"AP": 29.0})   # logged before the cost metrics
    evals = [_trial("e1", "eval", {"AP": 32.0, "cost/cpu_hours": 0.01}, train_run_id="ta"),
             _trial("e2", "eval", {"AP": 33.0, "cost/cpu_hours": 0.03}, train_run_id="tb")]
    variants = [Variant({"m": "base"}, "base", [old]), Variant({"m": "x"}, "x", evals)]
    table = results_table(variants, variants[0])
    attach_cost(table, [train_a, train_b, old, *evals])
    header, rows, _ = results_rows(table)
    assert header[-3:] == ["train h", "train CPU-h", "eval CPU-h"]   # no GPU used: no GPU-hours column
    cells = {r[0][0].split(" (")[0]: [c for c, _ in r[-3:]] for r in rows}
    assert cells["base"] == ["—", "—", "—"]                # logged before the cost metrics: unknown
    assert cells["x"] == ["1.500", "3.000", "0.020"]       # mean of its two trained models; its evals
