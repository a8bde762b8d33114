"""`ioulab compare RUN_ID ...`: the papers' table for any runs (sweep trials or plain train runs)."""
from __future__ import annotations

from tests.platform.report.helpers import cli, md_tables

M = "\u2212"
V = "roi_heads.box_loss.type="


def test_compare_prints_the_table_for_given_runs(store):
    ids = store.ids
    # t0 (smooth_l1, seed 0) and t2 (giou, seed 0) are sweep trials; "single" is a plain train run (ciou).
    rc, out, err = cli("compare", ids["t0"], ids["t2"], ids["single"], "--tracking-uri", store.uri)
    assert rc == 0, err
    # Only the box loss differs among the three: it names the rows (the key without its section).
    # Baseline: the first run.
    # Improvement = giou (38.6, best AP) − smooth_l1 (37.0), by hand.
    assert md_tables(out)[0] == [
        ["Variant", "AP", "AP50", "AP60", "AP70", "AP80", "AP90", "ΔAP", "n", "AP std"],
        [f"{V}smooth_l1 (baseline)", "37.0", "58.0", "54.0", "46.5", "33.0", "11.0", "baseline", "1", "—"],
        [f"{V}giou", "38.6", "57.5", "53.0", "47.0", "36.8", "17.4", "+1.6", "1", "—"],
        [f"{V}ciou", "38.4", "58.1", "54.0", "47.1", "35.2", "15.1", "+1.4", "1", "—"],
        ["**Improvement**", "+1.6", f"{M}0.5", f"{M}1.0", "+0.5", "+3.8", "+6.4", "", "", ""],
    ]
    assert "keys: roi_heads.box_loss.type = model.roi_heads.box_loss.type" in out
    assert f"roi_heads.box_loss.type=ciou: {ids['single']} (FINISHED)" in out


def test_compare_baseline_option_and_rows_with_equal_params(store):
    ids = store.ids
    # t0 and t1 differ only in train.seed; --baseline names a run that was not listed (added first).
    rc, out, err = cli("compare", ids["t0"], ids["t1"], "--baseline", ids["t2"], "--tracking-uri", store.uri)
    assert rc == 0, err
    rows = md_tables(out)[0]
    assert [r[0] for r in rows[1:]] == ["roi_heads.box_loss.type=giou, seed=0 (baseline)",
                                        "roi_heads.box_loss.type=smooth_l1, seed=0",
                                        "roi_heads.box_loss.type=smooth_l1, seed=1",
                                        "**Improvement**"]
    # Best non-baseline by AP is t1 (38.0): 38.0 − 38.6 and 58.8 − 57.5, by hand.
    assert rows[-1][1:3] == [f"{M}0.6", "+1.3"]


def test_compare_failed_run_and_unknown_id(store):
    ids = store.ids
    rc, out, _ = cli("compare", ids["t4"], ids["t5"], "--tracking-uri", store.uri)
    assert rc == 0
    assert "No finished trial: seed=1" in out and f"{ids['t5']} (FAILED)" in out
    assert "**Improvement**" not in out  # nothing to compare the baseline with
    rc, out, err = cli("compare", ids["t4"], "f" * 32, "--tracking-uri", store.uri)
    assert rc == 2 and f"unknown run id '{'f' * 32}'" in err
