"""Reports and `ioulab compare` show Δ with paired-bootstrap intervals from the logged per-image
matching, tell real differences from noise, and fall back for runs without it."""
from __future__ import annotations

import pytest

from ioulab.platform.report import charts
from ioulab.platform.report.command import build_report
from tests.platform.report.helpers import cli, md_tables

V = "roi_heads.box_loss.type="


@pytest.mark.timeout(180)
def test_report_shows_intervals_and_tells_real_from_noise(ci_store, tmp_path):
    out = tmp_path / "report"
    rc, stdout, err = cli("report", "ci", "--tracking-uri", ci_store.uri, "--out", out, "--no-log",
                          "--resamples", "300")
    assert rc == 0, err
    rows = md_tables(stdout)[0]
    header = rows[0]
    assert header[-4:] == ["ΔAP [95 % CI]", "vs baseline", "n", "AP std"]
    by_name = {r[0]: r for r in rows[1:]}
    ciou, giou = by_name[f"{V}ciou"], by_name[f"{V}giou"]
    # Δ [low, high]: the oracle-on-half variant is real, the reshuffled one is noise
    assert "[" in ciou[-4] and ciou[-3] == "real (95 %)" and ciou[-2] == "3"
    assert "[" in giou[-4] and giou[-3] == "within noise"
    improvement = rows[-1]
    assert improvement[0] == "**Improvement**" and all("[" in c and c.endswith(" *") for c in improvement[1:7])
    assert improvement[-3] == "real (95 %)"
    md = (out / "report.md").read_text()
    assert "resolve ΔAP of about ±" in md and "The smallest reported ΔAP" in md
    html = (out / "report.html").read_text()
    assert 'class="noise"' in html and "real (95 %)" in html and "[" in html


@pytest.mark.timeout(180)
def test_report_intervals_are_seeded(ci_store):
    a, _ = build_report(ci_store.client, "ci", resamples=100, bootstrap_seed=1)
    b, _ = build_report(ci_store.client, "ci", resamples=100, bootstrap_seed=1)
    c, _ = build_report(ci_store.client, "ci", resamples=100, bootstrap_seed=2)
    key = f"{V}ciou"
    ia, ib, ic = (r.table.intervals[key]["AP"] for r in (a, b, c))
    assert (ia.low, ia.high) == (ib.low, ib.high) != (ic.low, ic.high)
    assert ia.delta == pytest.approx(a.table.delta_ap(next(v for v in a.table.rows if v.name == key)), abs=1e-6)


@pytest.mark.timeout(180)
def test_delta_chart_draws_the_intervals(ci_store):
    report, _ = build_report(ci_store.client, "ci", resamples=100)
    fig = charts.delta_figure(report.table)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 1 and len(bars[0].lines[2][0].get_segments()) == 2   # one interval per variant
    assert any("delta_ap" == c.stem and "intervals" in c.title for c in report.charts)


@pytest.mark.timeout(180)
def test_compare_shows_intervals(ci_store):
    ids = ci_store.ids
    rc, out, err = cli("compare", ids["smooth_l10"], ids["ciou0"], ids["giou0"], "--tracking-uri", ci_store.uri,
                       "--resamples", "200")
    assert rc == 0, err
    rows = md_tables(out)[0]
    assert rows[0][-4:-2] == ["ΔAP [95 % CI]", "vs baseline"]
    names = {r[0]: r for r in rows[1:]}
    assert names[f"{V}ciou"][-3] == "real (95 %)" and "[" in names[f"{V}ciou"][-4]
    assert "[" in rows[-1][1] and "one seed per variant" in out


def test_runs_without_logged_matches_fall_back(store):
    rc, out, err = cli("compare", store.ids["t0"], store.ids["t2"], "--tracking-uri", store.uri)
    assert rc == 0, err
    assert "Intervals unavailable for 2 run(s)" in out
    assert md_tables(out)[0][0][-3] == "ΔAP"   # the plain table, no interval columns
