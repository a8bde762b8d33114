"""`ioulab report` on a handmade MLflow store: the papers' table, statuses, charts, artifacts."""
from __future__ import annotations

import base64
import json
import re

from ioulab.platform.report import charts
from ioulab.platform.report import table
from ioulab.platform.report.command import build_report
from ioulab.platform.report.runs import load_sweep
from tests.platform.report.conftest import LATENCY, LOSS
from tests.platform.report.helpers import cli, md_tables

M = "\u2212"  # the true minus sign
V = "roi_heads.box_loss.type="  # the variant names: the varying key without its section
HEADER = ["Variant", "AP", "AP50", "AP60", "AP70", "AP80", "AP90", "ΔAP", "n", "AP std"]


def _report(store, tmp_path, sweep, *extra):
    out = tmp_path / "out"
    rc, stdout, stderr = cli("report", sweep, "--tracking-uri", store.uri, "--out", out, *extra)
    assert rc == 0, stderr
    return out, (out / "report.md").read_text(), stdout


def test_results_table_matches_hand_computed_means_and_improvement(store, tmp_path):
    out, md, stdout = _report(store, tmp_path, "losses")
    # By hand: smooth_l1 = mean of seeds (37.0, 38.0) ... ; giou = mean of (38.6, 39.0) ...; ciou one
    # finished seed; diou only stopped. Improvement = giou (best AP) - smooth_l1 (space file baseline).
    assert md_tables(md)[0] == [
        HEADER,
        [f"{V}smooth_l1 (baseline)", "37.5", "58.4", "54.1", "46.6", "33.2", "11.2", "baseline", "2", "0.71"],
        [f"{V}ciou", "38.2", "58.0", "53.9", "46.9", "35.0", "15.0", "+0.7", "1", "—"],
        [f"{V}giou", "38.8", "57.6", "53.2", "47.0", "37.0", "17.5", "+1.3", "2", "0.28"],
        ["**Improvement**", f"+1.3", f"{M}0.8", f"{M}0.9", "+0.4", "+3.8", "+6.3", "", "", ""],
    ]
    assert ("Improvement = best variant by AP (roi_heads.box_loss.type=giou) − baseline "
            "(roi_heads.box_loss.type=smooth_l1)") in md
    assert "No finished trial: roi_heads.box_loss.type=diou" in md
    assert "| roi_heads.box_loss.type=giou | 38.8 |" in stdout  # the same table on stdout
    html = (out / "report.html").read_text()
    assert f'<td class="neg">{M}0.8</td>' in html and '<td class="pos">+6.3</td>' in html


def test_failed_and_stopped_trials_are_counted_and_named(store, tmp_path):
    out, md, stdout = _report(store, tmp_path, "losses")
    assert "7 trials: 5 finished, 1 failed, 1 stopped" in md and "7 trials: 5 finished" in stdout
    not_finished = md.split("Not finished:")[1]
    rows = md_tables(not_finished)[0]
    assert rows[0][:4] == ["Trial", "Stage", "Variant", "Status"]
    assert [r[:5] for r in rows[1:]] == [["t5", "train", f"{V}ciou", "FAILED", "FAILED"],
                                          ["t6", "train", f"{V}diou", "STOPPED", "KILLED"]]
    assert store.ids["t5"] in not_finished and store.ids["t6"] in not_finished
    html = (out / "report.html").read_text()
    assert re.search(r'<tr class="failed"><td class="name">t5</td>.*?FAILED', html)


def test_report_is_logged_to_the_parent_run(store, tmp_path):
    out, _, stdout = _report(store, tmp_path, "losses")
    parent = store.ids["losses"]
    logged = {a.path for a in store.client.list_artifacts(parent, "report")}
    assert logged == {f"report/{n}" for n in ("report.md", "report.html", "ap_by_iou.png", "delta_ap.png")}
    assert f"logged to MLflow run {parent}" in stdout
    local = store.client.download_artifacts(parent, "report/report.md", str(tmp_path / "dl"))
    assert open(local).read() == (out / "report.md").read_text()


def test_html_is_self_contained(store, tmp_path):
    out, _, _ = _report(store, tmp_path, "losses")
    html = (out / "report.html").read_text()
    assert "<style>" in html and "<link" not in html and "<script" not in html
    assert "url(" not in html and "@import" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)
    # The embedded charts are the PNG files written beside report.md.
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {(out / "ap_by_iou.png").read_bytes(), (out / "delta_ap.png").read_bytes()}
    assert not re.search(r'(href|src)="(https?:)?//', html)


def test_baseline_flag_overrides_the_space_file(store, tmp_path):
    _, md, _ = _report(store, tmp_path, "losses", "--baseline", "box_loss.type=giou")
    rows = md_tables(md)[0]
    assert rows[1][0] == "roi_heads.box_loss.type=giou (baseline)"
    # Best other variant by AP is ciou (38.2 > 37.5): ciou - giou by hand.
    assert rows[-1] == ["**Improvement**", f"{M}0.6", "+0.4", "+0.7", f"{M}0.1", f"{M}2.0", f"{M}2.5",
                        "", "", ""]
    assert [(r[0], r[7]) for r in rows[2:4]] == [("roi_heads.box_loss.type=ciou", f"{M}0.6"),
                                                 ("roi_heads.box_loss.type=smooth_l1", f"{M}1.3")]

    rc, _, err = cli("report", "losses", "--tracking-uri", store.uri, "--out", tmp_path / "x",
                     "--baseline", "box_loss.type=iou")
    assert rc == 2 and "matches no variant" in err and "roi_heads.box_loss.type=giou" in err


def test_lambda_sweep_charts_ap_against_lambda_one_line_per_trained_model(store, tmp_path):
    out, md, _ = _report(store, tmp_path, "lambda")
    rows = md_tables(md)[0][1:]
    # 2 models x 4 λ; the train trials' own metrics do not make rows of their own.
    assert len(rows) == 9 and rows[-1][0] == "**Improvement**"
    assert rows[0][0] == "iou_head.loss.type=smooth_l1, refine.lam=0.5 (baseline)" and rows[0][1] == "38.7"
    assert rows[-1][1] == "+0.9"  # bce λ=2 (39.6) − smooth_l1 λ=0.5 (38.7)
    assert (out / "ap_vs_lambda.png").stat().st_size > 10_000
    assert "iou_head.loss.type=bce: best λ=2 (AP 39.6)" in md
    assert "iou_head.loss.type=smooth_l1: best λ=2 (AP 39.3)" in md

    sweep = load_sweep(store.client, "lambda")
    series = table.lambda_series(table.result_trials(sweep.trials), sweep.varying_keys)
    fig = charts.lambda_figure(series)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2  # one per trained model, the failed λ=8 trial adds no point
    assert sorted(l.get_label() for l in lines) == ["iou_head.loss.type=bce (best λ=2: 39.6)",
                                                     "iou_head.loss.type=smooth_l1 (best λ=2: 39.3)"]
    assert [list(l.get_xdata()) for l in lines] == [[0.5, 1.0, 2.0, 4.0]] * 2
    assert list(lines[0].get_ydata()) == [39.0, 39.4, 39.6, 39.1]  # bce
    assert "1 failed" in md and "eval-bce-8.0" in md


def test_nms_sweep_table_and_latency_from_the_parent_artifact(store, tmp_path):
    _, md, _ = _report(store, tmp_path, "nms")
    nms = md.split("## NMS comparison")[1]
    # Keys in the space file's order (type, then beta); ΔAP75 by hand: 41.9 − 41.0, 41.5 − 41.0.
    assert md_tables(nms)[0] == [
        ["Inference setting", "AP", "AP50", "AP75", "AP90", "ΔAP", "ΔAP75", "n"],
        ["nms.type=greedy, nms.beta=1.0 (baseline)", "38.2", "58.0", "41.0", "12.0", "—", "—", "1"],
        ["nms.type=diou, nms.beta=0.9", "38.6", "58.0", "41.9", "12.0", "+0.4", "+0.9", "1"],
        ["nms.type=diou, nms.beta=1.0", "38.5", "58.0", "41.5", "12.0", "+0.3", "+0.5", "1"],
    ]
    speed = md.split("## Inference speed: Inference latency, batch 1")[1]
    assert md_tables(speed)[0] == [["row", "latency_ms", "fps", "AP", "ratio"],
                                   ["Faster R-CNN", "50.0", "20.0", "37.6", "1.00"],
                                   ["+ IoU-NMS + refine", "84.8", "11.8", "39.3", "1.70"]]
    assert "- refinement alone costs 22.6 ms" in md
    assert "ap_vs_lambda" not in md  # not a λ sweep


def test_latency_file_option(store, tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps(dict(LATENCY, title="CPU latency")))
    _, md, _ = _report(store, tmp_path, "losses", "--latency", path)
    assert "## Inference speed: CPU latency" in md and "| + IoU-NMS + refine | 84.8 |" in md


def test_unknown_sweep_lists_the_known_ones(store, tmp_path):
    rc, out, err = cli("report", "no-such-sweep", "--tracking-uri", store.uri, "--out", tmp_path)
    assert rc == 2 and out == ""
    assert "unknown sweep or run 'no-such-sweep'" in err
    for name in ("losses", "lambda", "nms"):
        assert f"  {name}  (parent run {store.ids[name]})" in err
    rc, _, err = cli("report", "0" * 32, "--tracking-uri", store.uri)
    assert rc == 2 and "losses" in err
    rc, _, err = cli("report", store.ids["t0"], "--tracking-uri", store.uri)  # a trial, not a parent
    assert rc == 2 and "is not a sweep's parent run (ioulab.role=trial)" in err and "ioulab compare" in err


def test_default_tracking_uri_and_out_dir_and_parent_id(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    rc, _, err = cli("report", store.ids["nms"], "--no-log")
    assert rc == 0, err
    assert "## NMS comparison" in (tmp_path / "reports" / "nms" / "report.md").read_text()


def test_build_report_without_files(store):
    report, sweep = build_report(store.client, "losses")
    assert [v.name for v in report.table.rows] == [f"{V}smooth_l1", f"{V}ciou", f"{V}giou"]
    assert report.table.best.name == f"{V}giou" and report.keys == {"roi_heads.box_loss.type": LOSS}
    assert len(sweep.trials) == 7 and [c.stem for c in report.charts] == ["ap_by_iou", "delta_ap"]


def test_rerun_sweep_name_reports_the_newest_and_empty_sweep_reports_nothing_yet(store, tmp_path):
    _, md, _ = _report(store, tmp_path, "rerun")
    rows = md_tables(md)[0]
    # One variant: it is the baseline (no baseline in the space file: the first), no Improvement row.
    assert rows[1][:2] == [f"{V}giou (baseline)", "31.0"] and len(rows) == 2
    assert f"no baseline in the space file: the first variant, {V}giou" in md
    assert f"2 sweeps are named 'rerun': reporting the newest ({store.ids['rerun1']})" in md
    assert store.ids["rerun0"] in md.split("## Notes")[1]

    out, md, stdout = _report(store, tmp_path, "empty")
    assert md_tables(md)[0] == [HEADER] and "0 trials: 0 finished, 0 failed, 0 stopped" in stdout
    assert (out / "report.html").exists() and not list(out.glob("*.png"))
