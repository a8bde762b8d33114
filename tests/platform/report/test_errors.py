"""The report's "Where the AP goes" section (platform/report/errors.py) over a sweep whose trials
logged the real error analysis of handmade detections: a baseline, and a "refined" variant whose
boxes were moved halfway to their objects (localization error must fall); markdown and HTML, and
the HTML in headless Chromium."""
from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from ioulab.detector.engine import cocoeval
from ioulab.detector.engine import erroranalysis
from ioulab.platform.bench.eval import synthetic_eval_set
from ioulab.platform.report.table import fmt_delta
from tests.platform.report.helpers import cli, md_tables
from tests.platform.report.store import SweepStore

MODE = "inference.mode"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _refined(gt: dict, dets: list[dict], step: float) -> list[dict]:
    """Each box moved ``step`` of the way to the same-class object it overlaps most (if any)."""
    from pycocotools import mask as mask_utils

    by_key: dict[tuple, list[dict]] = {}
    for a in gt["annotations"]:
        by_key.setdefault((a["image_id"], a["category_id"]), []).append(a)
    out = []
    for d in dets:
        gts = by_key.get((d["image_id"], d["category_id"]), [])
        box = np.array(d["bbox"], dtype=float)
        if gts:
            ious = np.asarray(mask_utils.iou([d["bbox"]], [g["bbox"] for g in gts], [0] * len(gts))).ravel()
            if ious.max() > 0.05:
                box += step * (np.array(gts[int(ious.argmax())]["bbox"]) - box)
        out.append({**d, "bbox": box.round(2).tolist()})
    return out


@pytest.fixture(scope="module")
def err_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow_err")
    gt, dets, _ = synthetic_eval_set(24, 4, 24, seed=5)
    st = SweepStore(tmp)
    p = st.parent("where", [MODE], {MODE: "baseline"})
    ids = {"parent": p}
    for mode, step in (("baseline", 0.0), ("iou_nms", 0.3), ("refine", 0.6)):
        variant = _refined(gt, dets, step)
        analysis, matches = erroranalysis.analyze_and_match(gt, variant)
        folder = tmp / mode
        folder.mkdir()
        erroranalysis.write(folder, analysis, matches)
        metrics = {**cocoeval.evaluate(gt, variant), **analysis.metrics()}
        rid = ids[mode] = st.trial(p, "where", mode, {MODE: mode}, metrics, stage="eval")
        st.client.log_artifact(rid, str(folder / erroranalysis.ERRORS_FILE))
        st.client.log_artifact(rid, str(folder / erroranalysis.MATCHES_FILE))
        ids[f"{mode}_matches"] = matches
        cocoeval.match(gt, variant).save(folder / "eval_matches.npz")
        st.client.log_artifact(rid, str(folder / "eval_matches.npz"))
        ids[f"{mode}_analysis"] = analysis
    return SimpleNamespace(uri=st.uri, client=st.client, ids=ids)


def test_section_shows_breakdown_deltas_classes_and_curves(err_store, tmp_path):
    out = tmp_path / "report"
    rc, _, err = cli("report", "where", "--tracking-uri", err_store.uri, "--out", out, "--no-log",
                     "--resamples", "0")
    assert rc == 0, err
    md = (out / "report.md").read_text()
    assert "## Where the AP goes" in md and "![Precision-recall at IoU 0.9" in md
    assert (out / "pr_iou90.png").read_bytes()[:4] == b"\x89PNG"
    section = md[md.index("## Where the AP goes"):]
    tide, counts, coco, classes = md_tables(section)[:4]
    assert tide[0] == ["Variant", *erroranalysis.TIDE_TYPES] and coco[0] == ["Variant", *erroranalysis.COCO_STEPS]
    base, refine = err_store.ids["baseline_analysis"], err_store.ids["refine_analysis"]
    rows = {r[0]: r for r in tide[1:]}
    loc = 1 + erroranalysis.TIDE_TYPES.index("loc")
    assert rows["mode=baseline (baseline)"][loc] == f"{base.tide_delta['loc']:.1f}"
    delta = refine.tide_delta["loc"] - base.tide_delta["loc"]
    assert delta < 0   # moving boxes onto their objects removes localization error
    assert rows["mode=refine"][loc] == f"{refine.tide_delta['loc']:.1f} (\u2212{abs(delta):.1f})"
    assert "Localization error at IoU .1–.5 (TIDE loc, ΔAP50 if fixed): mode=baseline " \
           f"{base.tide_delta['loc']:.1f} → mode=iou_nms" in section
    gap = base.coco["C50"] - base.coco["C75"], refine.coco["C50"] - refine.coco["C75"]
    assert "Localization error at strict IoU (COCO C50 − C75" in section
    assert f"mode=baseline {gap[0]:.1f} → " in section and f"mode=refine {gap[1]:.1f}: it " in section
    # per-class ΔAP of the best variant (refine), sorted from the biggest gain down
    assert classes[0] == ["Class", "baseline AP", "best AP", "ΔAP"] and "mode=refine (best)" in section
    deltas = [refine.class_ap[r[0]] - base.class_ap[r[0]] for r in classes[1:]]
    assert deltas == sorted(deltas, reverse=True) and len(deltas) == len(base.class_ap)
    html = (out / "report.html").read_text()
    assert "<h2>Where the AP goes</h2>" in html and html.count("data:image/png;base64,") >= 2


def test_strict_iou_localization_change_carries_the_bootstrap_interval(err_store):
    from ioulab.platform.report.command import build_report

    report, _ = build_report(err_store.client, "where", resamples=200)
    (section,) = [s for s in report.sections if s.title == "Where the AP goes"]
    (strict,) = [n for n in section.notes if n.startswith("Localization error at strict IoU (COCO C50 − C75")]
    iv = report.table.intervals["mode=refine"]
    samples = iv["AP50"].samples - iv["AP75"].samples
    low, high = np.percentile(samples, [2.5, 97.5])
    assert low <= iv["AP50"].delta - iv["AP75"].delta <= high
    assert f"mode=refine {err_store.ids['refine_analysis'].coco['C50'] - err_store.ids['refine_analysis'].coco['C75']:.1f} (Δ " in strict
    assert f"[{fmt_delta(low)}, {fmt_delta(high)}])" in strict


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def test_breakdown_cells_carry_paired_bootstrap_intervals(err_store):
    """Every Δ of the three tables has the interval of the paired bootstrap, recomputed here from
    the logged error matchings on the results table's image resamples (same seed and count)."""
    from ioulab.detector.engine import bootstrap
    from ioulab.platform.report.command import build_report
    from ioulab.platform.report.render import md_table

    report, _ = build_report(err_store.client, "where", resamples=200)
    (section,) = [s for s in report.sections if s.title == "Where the AP goes"]
    base, refine = err_store.ids["baseline_matches"], err_store.ids["refine_matches"]
    weights = bootstrap.resample_weights(len(base.image_ids), 200, np.random.default_rng(0))
    a, b = erroranalysis.ErrorAccumulator(base)(weights), erroranalysis.ErrorAccumulator(refine)(weights)
    tide = md_tables(md_table(*section.tables[0][1]))[0]
    row = {r[0]: r for r in tide[1:]}["mode=refine"]
    loc = row[1 + erroranalysis.TIDE_TYPES.index("loc")]
    low, high = _percentiles(b["err/loc"] - a["err/loc"])
    assert f"[{fmt_delta(low)}, {fmt_delta(high)}]" in loc
    assert high < 0 and loc.endswith(" *)")     # boxes moved onto their objects: fewer loc errors, beyond noise
    coco = md_tables(md_table(*section.tables[2][1]))[0]
    c75 = {r[0]: r for r in coco[1:]}["mode=refine"][1]
    low, high = _percentiles(b["err/coco_c75"] - a["err/coco_c75"])
    assert f"[{fmt_delta(low)}, {fmt_delta(high)}]" in c75
    counts = md_tables(md_table(*section.tables[1][1]))[0]
    n_loc = {r[0]: r for r in counts[1:]}["mode=refine"][1 + erroranalysis.TIDE_TYPES.index("loc")]
    assert "[" in n_loc and n_loc.startswith(f"{err_store.ids['refine_analysis'].tide_count['loc']} (")
    assert any(n.startswith("Intervals: Δ against the baseline") for n in section.notes)
    # the strict-IoU verdicts: C50 − C75 and C75 − C90, each with its interval
    (c90,) = [n for n in section.notes if n.startswith("Localization error at strict IoU (COCO C75 − C90")]
    iv = report.table.intervals["mode=refine"]
    low, high = _percentiles(iv["AP75"].samples - iv["AP90"].samples)
    assert f"[{fmt_delta(low)}, {fmt_delta(high)}])" in c90


def test_runs_without_error_matches_are_named_not_hidden(err_store):
    """A run evaluated before error_matches.npz existed keeps its Δ without an interval and the
    section says how many such runs there are."""
    from ioulab.platform.report import errors
    from ioulab.platform.report.command import build_report

    report, _ = build_report(err_store.client, "where", resamples=100)
    store = errors.ErrorMatchStore(err_store.client)
    section = errors.where_section(report.table, errors.ErrorStore(err_store.client),
                                   lambda rid: None if rid == err_store.ids["iou_nms"] else store(rid), 100)
    tide = section.tables[0][1][1]
    cells = {r[0][0]: r for r in tide}
    assert "[" not in cells["mode=iou_nms"][2][0] and "[" in cells["mode=refine"][2][0]
    assert any(n.startswith("No breakdown intervals for 1 run(s) without a logged error_matches.npz")
               for n in section.notes)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: headless render test skipped")
def test_section_renders_in_headless_chromium(err_store, tmp_path):
    out = tmp_path / "report"
    rc, _, err = cli("report", "where", "--tracking-uri", err_store.uri, "--out", out, "--no-log",
                     "--resamples", "0")
    assert rc == 0, err
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", (out / "report.html").as_uri()], capture_output=True,
                         text=True, timeout=60).stdout
    assert "Where the AP goes" in dom and "Per-class ΔAP" in dom
    assert 'alt="Precision-recall at IoU 0.9: baseline and best"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1400,4000", (out / "report.html").as_uri()],
                   capture_output=True, text=True, timeout=60)
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert img.mean(axis=2).std() > 15   # drawn, not blank
    shutil.copy(shot, out / "screenshot.png")
    print(f"screenshot: {out / 'screenshot.png'}")


def test_per_class_delta_carries_its_interval(err_store):
    """The per-class ΔAP of the best variant has the paired-bootstrap interval of that class's AP
    (IoU .50:.95), recomputed here from the logged eval_matches.npz on the same resamples."""
    from ioulab.detector.engine import bootstrap
    from ioulab.platform.report import errors
    from ioulab.platform.report.command import build_report
    from ioulab.platform.report.render import md_table

    report, _ = build_report(err_store.client, "where", resamples=200)
    (section,) = [s for s in report.sections if s.title == "Where the AP goes"]
    (title, table), = [(t, tb) for t, tb in section.tables if t.startswith("Per-class ΔAP")]
    assert title.endswith("[95 % interval]")
    rows = {r[0]: r for r in md_tables(md_table(*table))[0][1:]}
    gt, _, _ = synthetic_eval_set(24, 4, 24, seed=5)
    names = [str(c["name"]) for c in sorted(gt["categories"], key=lambda c: c["id"])]
    matches = errors.MatchStore(err_store.client)
    weights = bootstrap.resample_weights(24, 200, np.random.default_rng(0))
    metrics = [f"class/{k}" for k in range(len(names))]
    a = errors.ClassAP(matches(err_store.ids["baseline"]), metrics)(weights)
    b = errors.ClassAP(matches(err_store.ids["refine"]), metrics)(weights)
    point_a = errors.ClassAP(matches(err_store.ids["baseline"]), metrics)()
    analysis = err_store.ids["baseline_analysis"]
    for k, name in enumerate(names):
        if analysis.class_ap[name] is None:
            continue
        assert point_a[f"class/{k}"][0] == pytest.approx(analysis.class_ap[name], abs=1e-3)   # same AP as errors.json
        low, high = _percentiles(b[f"class/{k}"] - a[f"class/{k}"])
        assert f"[{fmt_delta(low)}, {fmt_delta(high)}]" in rows[name][3]
