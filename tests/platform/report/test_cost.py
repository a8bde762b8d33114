"""The results table's training-cost columns (platform/report/cost.py): an evaluation variant
costs the training of the model it evaluates; GPU-hours appear only where a GPU was used; the
inference side (ms/img) only where an evaluation measured it."""
from ioulab.platform.report.cost import attach_cost
from ioulab.platform.report.render import Report, results_markdown, results_rows, to_html
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


def _latency_table(with_metric: bool):
    ms = {"time/infer_ms_per_image": 40.0} if with_metric else {}
    params = {"inference.batch_size": "2"}
    base = [Trial("b1", "b1", "FINISHED", "FINISHED", "eval", params, {"AP": 30.0, **ms}, {}),
            Trial("b2", "b2", "FINISHED", "FINISHED", "eval", params,
                  {"AP": 31.0, **({"time/infer_ms_per_image": 50.0} if with_metric else {})}, {}),
            Trial("b3", "b3", "FAILED", "FAILED", "eval", params, {"time/infer_ms_per_image": 999.0}, {})]
    other = [Trial("x1", "x1", "FINISHED", "FINISHED", "eval", params, {"AP": 33.0}, {})]  # logged before the metric
    variants = [Variant({"m": "base"}, "base", base), Variant({"m": "x"}, "x", other)]
    table = results_table(variants, variants[0])
    attach_cost(table, base + other)
    return table


def test_latency_column_where_measured():
    """ms/img: the mean over a variant's finished trials that logged the forward time (— where none
    did), in markdown and HTML, with a note saying what it is; absent when no run has it."""
    table = _latency_table(with_metric=True)
    header, rows, _ = results_rows(table)
    assert header[-1] == "ms/img" and "train CPU-h" not in header    # no cost metrics: no cost columns
    cells = {r[0][0].split(" (")[0]: r[-1][0] for r in rows}
    assert cells == {"base": "45.0", "x": "—", "Improvement": ""}   # the failed trial's 999 is not counted
    markdown = results_markdown(table)
    assert "| ms/img |" in markdown and "| 45.0 |" in markdown
    note = next(line for line in markdown.split("\n\n") if line.startswith("ms/img:"))
    assert "inference.batch_size=2" in note and "ioulab bench latency --checkpoint CKPT" in note
    page = to_html(Report("t", table))
    assert '<th class="num">ms/img</th>' in page and "<td class=\"num\">45.0</td>" in page
    assert "ioulab bench latency --checkpoint CKPT" in page

    plain = _latency_table(with_metric=False)
    header, rows, _ = results_rows(plain)
    assert "ms/img" not in header and header == results_rows(plain)[0]
    assert header[-2:] == ["n", "AP std"]                             # the old columns, nothing after
    assert "ms/img" not in results_markdown(plain) and "ms/img" not in to_html(Report("t", plain))
