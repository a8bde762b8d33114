"""`ioulab report` with the paper's numbers beside ours: a sweep whose parent run carries the space
file's ``paper:`` block (tag ``ioulab.paper``) gets the paper's AP, AP90 and Δ next to our Δ, in
markdown and HTML; rows the paper has no number for show —."""
from __future__ import annotations

import html
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ioulab.platform.report import charts
from ioulab.platform.report.paper import Paper, PaperRow, paper_columns, parse_paper
from ioulab.platform.report.render import Report, results_markdown, results_rows, to_html
from ioulab.platform.report.runs import Trial
from ioulab.platform.report.table import Variant, results_table
from ioulab.platform.sweep.space import load_space
from tests.platform.report.helpers import cli, md_tables
from tests.platform.report.store import SweepStore, ap

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
M = "\u2212"
# Our AP per point of the shipped ablation.yaml / lambda.yaml (the paper's are in the files).
ABLATION_AP = {"inference.mode=baseline": 30.0, "inference.mode=iou_regular_nms": 30.0,
               "inference.mode=iou_nms,iou_nms.rank=iou": 30.5,
               "inference.mode=iou_nms,iou_nms.rank=iou_x_score": 30.7,
               "inference.mode=refine,refine.lam=0.5": 31.0, "inference.mode=refine,refine.lam=2.0": 31.2}


def _sweep(st: SweepStore, name: str, plan, aps, paper_tag: str | None) -> str:
    """A finished eval-only sweep of ``plan``'s points, tagged like the driver tags the parent."""
    tags = {"ioulab.paper": paper_tag} if paper_tag is not None else {}
    p = st.parent(name, plan.varying_keys, plan.baseline, tags=tags)
    train = st.trial(p, name, "train", {}, ap(29.0, 50.0, 45.0, 40.0, 30.0, 10.0))
    for point in plan.eval_points:
        a = aps(point)
        st.trial(p, name, f"eval-{point.index}", point.overrides, ap(a, a + 20, a + 15, a + 8, a - 4, a - 20),
                 stage="eval", train_run_id=train)
    return p


@pytest.fixture(scope="module")
def paper_store(tmp_path_factory):
    st = SweepStore(tmp_path_factory.mktemp("mlflow_paper"))
    ablation = load_space(SPACES / "ablation.yaml")
    lam = load_space(SPACES / "lambda.yaml")
    tag = json.dumps(ablation.paper.to_json())
    _sweep(st, "ablation", ablation, lambda p: ABLATION_AP[p.label], tag)
    _sweep(st, "plain", ablation, lambda p: ABLATION_AP[p.label], None)
    _sweep(st, "garbled", ablation, lambda p: ABLATION_AP[p.label], "{not json")
    _sweep(st, "lambda", lam, lambda p: 30.0 + p.overrides["inference.refine.lam"],
           json.dumps(lam.paper.to_json()))
    return SimpleNamespace(uri=st.uri)


def _report(store, tmp_path, sweep, *extra):
    out = tmp_path / sweep
    rc, stdout, stderr = cli("report", sweep, "--tracking-uri", store.uri, "--out", out, "--no-log", *extra)
    assert rc == 0, stderr
    return (out / "report.md").read_text(), (out / "report.html").read_text(), stdout


def test_ablation_report_puts_the_papers_numbers_beside_ours(paper_store, tmp_path):
    md, html, stdout = _report(paper_store, tmp_path, "ablation")
    table = md_tables(md)[0]
    assert table[0] == ["Variant", "AP", "AP50", "AP60", "AP70", "AP80", "AP90", "ΔAP",
                        "paper AP", "paper AP90", "paper ΔAP", "n", "AP std"]
    rows = {r[0]: r[7:11] for r in table[1:]}
    # By hand: paper ΔAP = the paper's AP of the row - the paper's 37.8 of the baseline row.
    assert rows == {
        "mode=baseline, iou_nms.rank=iou, refine.lam=0.5 (baseline)": ["baseline", "37.8", "—", "baseline"],
        "mode=iou_nms, iou_nms.rank=iou, refine.lam=0.5": ["+0.5", "38.7", "—", "+0.9"],
        "mode=refine, iou_nms.rank=iou, refine.lam=0.5": ["+1.0", "39.3", "17.5", "+1.5"],
        "mode=iou_regular_nms, iou_nms.rank=iou, refine.lam=0.5": ["0.0", "—", "—", "—"],
        "mode=iou_nms, iou_nms.rank=iou_x_score, refine.lam=0.5": ["+0.7", "—", "—", "—"],
        "mode=refine, iou_nms.rank=iou, refine.lam=2.0": ["+1.2", "—", "—", "—"],
        "**Improvement**": ["", "", "", ""],  # the improvement is under the metric columns
    }
    assert "Paper: IoUNet reproduction (OpenMMLab-IoUNet, MMDetection v2.14)" in md
    assert "| 39.3 | 17.5 | +1.5 |" in stdout  # the same table on stdout
    assert '<th class="num">paper ΔAP</th>' in html and '<td class="pos">+1.5</td>' in html
    assert "<td class=\"num\">38.7</td>" in html and "Paper: IoUNet reproduction" in html


def test_published_delta_shows_against_the_space_files_baseline_only(paper_store, tmp_path):
    md, _, _ = _report(paper_store, tmp_path, "lambda")
    table = md_tables(md)[0]
    assert table[0][7:11] == ["ΔAP", "paper AP", "paper AP90", "paper ΔAP"]
    rows = {r[0]: r[7:11] for r in table[1:]}
    assert rows["refine.lam=0.5 (baseline)"] == ["baseline", "39.3", "17.5", "baseline"]
    assert rows["refine.lam=2.0"] == ["+1.5", "—", "—", "+0.1"]  # "λ=2.0 instead of 0.5: +0.1"
    assert rows["refine.lam=1.0"] == ["+0.5", "—", "—", "—"]
    # Another baseline: the paper's Δ against λ 1.0 is not published, nor computable.
    md, _, _ = _report(paper_store, tmp_path, "lambda", "--baseline", "lam=1.0")
    rows = {r[0]: r[7:11] for r in md_tables(md)[0][1:]}
    assert rows["refine.lam=2.0"] == ["+1.0", "—", "—", "—"]
    assert rows["refine.lam=0.5"] == [f"{M}0.5", "39.3", "17.5", "—"]
    assert rows["refine.lam=1.0 (baseline)"][3] == "—"
    assert "published Δs are against the space file's baseline" in md


@pytest.mark.parametrize("sweep", ["plain", "garbled"])
def test_without_a_readable_paper_block_the_table_is_unchanged(paper_store, tmp_path, sweep):
    md, html, _ = _report(paper_store, tmp_path, sweep)
    assert md_tables(md)[0][0] == ["Variant", "AP", "AP50", "AP60", "AP70", "AP80", "AP90", "ΔAP", "n", "AP std"]
    assert "Paper:" not in md and "paper ΔAP" not in md and "paper ΔAP" not in html


def test_parse_paper_reads_the_space_files_block_back():
    plan = load_space(SPACES / "lambda.yaml", profile="r50")
    paper = parse_paper({"ioulab.paper": json.dumps(plan.paper.to_json())})
    assert paper.source == plan.paper.source
    assert [(r.variant, r.values, r.delta) for r in paper.rows] == [
        (r.variant, r.values, r.delta) for r in plan.paper.rows]
    assert parse_paper({}) is None and parse_paper({"ioulab.paper": "[1]"}) is None


def _variant(value: str, ap_: float) -> Variant:
    trial = Trial(run_id=f"{value:0>32}", name=value, status="FINISHED", run_status="FINISHED", stage="train",
                  params={"k": value}, metrics={"AP": ap_, "AP90": ap_ - 20}, tags={})
    return Variant({"k": value}, f"k={value}", [trial])


def test_paper_columns_line_up_with_intervals_and_the_source_stays_text():
    variants = [_variant("a", 30.0), _variant("b", 31.0), _variant("c", 29.0)]
    table = results_table(variants, variants[0], columns=("AP", "AP90"))
    iv = SimpleNamespace(delta=1.0, low=0.2, high=1.8, excludes_zero=True)
    table.intervals = {v.name: {"AP": iv, "AP90": iv} for v in variants[1:]}
    source = '<script>alert("x")</script> | table 3'
    paper = Paper(source, [PaperRow({"k": "a"}, {"AP": 37.8}), PaperRow({"k": "b"}, {"AP": 38.7, "AP90": 17.5}),
                           PaperRow({"k": "zzz"}, {"AP": 1.0})])
    table.paper = paper_columns(paper, table.rows, table.baseline, published_deltas=True)
    header, rows, _ = results_rows(table)
    assert header == ["Variant", "AP", "AP90", "ΔAP [95 % CI]", "vs baseline", "paper AP", "paper AP90",
                      "paper ΔAP", "n", "AP std"]
    assert all(len(r) == len(header) for r in rows)  # the Improvement row too
    assert [[c for c, _ in r[5:8]] for r in rows[:3]] == [["37.8", "—", "baseline"], ["38.7", "17.5", "+0.9"],
                                                          ["—", "—", "—"]]
    md = results_markdown(table)
    assert all(len(r) == len(header) for r in md_tables(md)[0])
    assert "Paper row k=zzz: no variant with results." in md
    page = to_html(Report(title="t", table=table))
    assert "<script" not in page and html.escape(source) in page
    marks = [line for line in charts.delta_figure(table).axes[0].get_lines() if line.get_label() == "the paper's ΔAP"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == pytest.approx([0.9])  # on row k=b (y 0)
    assert list(marks[0].get_ydata()) == [0]
