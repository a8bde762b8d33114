"""Table logic without MLflow: signs, names, baseline matching, grouping, λ lines."""
from __future__ import annotations

import pytest

from ioulab.platform.report import charts
from ioulab.platform.report import table as report_table
from ioulab.platform.report.runs import ReportError, Trial

M = "\u2212"


def trial(run_id, params, ap=None, status="FINISHED", stage="train", train_run_id=None):
    tags = {"ioulab.train_run_id": train_run_id} if train_run_id else {}
    return Trial(run_id=run_id, name=run_id, status=status, run_status=status, stage=stage,
                 params={k: str(v) for k, v in params.items()}, metrics={} if ap is None else {"AP": ap},
                 tags=tags)


def test_signs_like_the_papers():
    assert [report_table.fmt_delta(v) for v in (1.7, -0.8, 0.04, -0.04, 0.0, None)] == \
        ["+1.7", f"{M}0.8", "0.0", "0.0", "0.0", "—"]
    assert report_table.fmt(37.649) == "37.6" and report_table.fmt(None) == "—"


def test_short_labels_drop_the_section_unless_ambiguous():
    keys = ["model.roi_heads.box_loss.type", "inference.refine.lam", "train.seed", "data.synth.seed"]
    assert report_table.short_labels(keys) == {"model.roi_heads.box_loss.type": "roi_heads.box_loss.type",
                                    "inference.refine.lam": "refine.lam", "train.seed": "seed",
                                    "data.synth.seed": "synth.seed"}
    assert report_table.short_labels(["model.x.y", "train.x.y"]) == {"model.x.y": "model.x.y", "train.x.y": "train.x.y"}


def test_values_and_keys_match_loosely_but_not_ambiguously():
    assert report_table.values_equal("2.0", 2) and report_table.values_equal("True", True)
    assert report_table.values_equal("giou", "giou")
    assert not report_table.values_equal("2.0", "2.5") and not report_table.values_equal("giou", "ciou")
    known = ["inference.refine.lam", "inference.nms.type", "model.roi_heads.box_loss.type"]
    assert report_table.parse_baseline(["lam=2", "box_loss.type=giou"], known) == {
        "inference.refine.lam": "2", "model.roi_heads.box_loss.type": "giou"}
    with pytest.raises(ReportError, match="ambiguous"):
        report_table.resolve_key("type", known)
    with pytest.raises(ReportError, match="KEY=VALUE"):
        report_table.parse_baseline(["lam"], known)


def test_seeds_are_averaged_and_evaluated_train_trials_left_out():
    train = trial("tr", {"m": "a", "inference.refine.lam": 0.5, "train.seed": 0}, ap=10.0)
    trials = [train,
              trial("e1", {"m": "a", "inference.refine.lam": 0.5, "train.seed": 0}, 30.0, stage="eval",
                    train_run_id="tr"),
              trial("e2", {"m": "a", "inference.refine.lam": 0.5, "train.seed": 1}, 32.0, stage="eval"),
              trial("x", {"m": "b", "inference.refine.lam": 0.5, "train.seed": 0}, status="FAILED")]
    shown = report_table.result_trials(trials)
    assert [t.run_id for t in shown] == ["e1", "e2", "x"]
    ident = report_table.identity_keys(["m", "inference.refine.lam", "train.seed"], shown)
    assert ident == ["m", "inference.refine.lam"]
    variants = report_table.group_variants(shown, ident)
    table = report_table.results_table(variants, variants[0])
    assert [(v.name, v.n, v.mean("AP")) for v in table.rows] == [("m=a, refine.lam=0.5", 2, 31.0)]
    assert [v.name for v in table.no_results] == ["m=b, refine.lam=0.5"]
    assert table.improvement is None  # nothing but the baseline has results


def test_lambda_lines_without_train_run_tag_group_by_model_keys_and_seed():
    lam = report_table.LAMBDA_KEY
    trials = [trial(f"{m}{s}{x}", {"model.iou_head.loss.type": m, "train.seed": s, lam: x}, ap=30 + x + s,
                    stage="eval")
              for m in ("bce", "smooth_l1") for s in (0, 1) for x in (0.5, 2.0)][:-1]
    series = report_table.lambda_series(trials, ["model.iou_head.loss.type", "train.seed", lam])
    assert [s.label for s in series] == ["iou_head.loss.type=bce, seed=0", "iou_head.loss.type=bce, seed=1",
                                         "iou_head.loss.type=smooth_l1, seed=0",
                                         "iou_head.loss.type=smooth_l1, seed=1"]
    assert [len(s.points) for s in series] == [2, 2, 2, 1]
    assert series[1].best == (2.0, 33.0, 1)
    assert len(charts.lambda_figure(series).axes[0].get_lines()) == 4


def test_choose_baseline_strict_and_lenient():
    variants = report_table.group_variants([trial("a", {"k": 1}, 1.0), trial("b", {"k": 2}, 2.0)], ["k"])
    assert report_table.choose_baseline(variants, {"k": "2.0"}, "--baseline", strict=True)[0].name == "k=2"
    with pytest.raises(ReportError, match="k=1"):
        report_table.choose_baseline(variants, {"k": 3}, "--baseline", strict=True)
    base, notes = report_table.choose_baseline(variants, {"k": 3}, "space file", strict=False)
    assert base.name == "k=1" and "matches no variant" in notes[0]
