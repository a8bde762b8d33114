"""The report's section "Where the AP goes": why AP moved, from what every evaluation logs
(:mod:`ioulab.detector.engine.erroranalysis`: the ``err/...`` metrics and ``errors.json``).

* TIDE-style ΔAP50 per variant (what fixing each error type would gain; lower = fewer such
  errors) and COCO's error analysis (AP as each kind of error is forgiven in turn), each with
  its Δ against the baseline;
* the per-class ΔAP of the best variant against the baseline, biggest gains and losses first;
* the precision-recall curves of baseline and best at IoU 0.9.

Values are means over a variant's finished trials. Each Δ carries the 95 % interval of a paired
bootstrap over the validation images when the runs logged ``error_matches.npz`` (the per-image
matchings behind the breakdown: :class:`~ioulab.detector.engine.erroranalysis.ErrorAccumulator`
recomputes every column on each resample, with the results table's resamples).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np

from ioulab.detector.engine import cocoeval, erroranalysis
from ioulab.detector.engine.cocoeval import RECALL_THRESHOLDS
from ioulab.platform import mlflow_names
from ioulab.platform.report import charts
from ioulab.detector.engine.bootstrap import Interval
from ioulab.platform.report.intervals import DEFAULT_RESAMPLES, Bootstrapper, MatchStore, compare_rows
from ioulab.platform.report.render import Cell, Chart, Section, delta_cell
from ioulab.platform.report.table import ResultsTable, Variant, fmt, fmt_delta, fmt_interval

TITLE = "Where the AP goes"
CHART_STEM = "pr_iou90"
CLASS_ROWS = 5           # gains and losses shown each (all classes when there are few)


class ErrorStore(MatchStore):
    """The logged :class:`~ioulab.detector.engine.erroranalysis.ErrorAnalysis` of each run."""

    artifact = erroranalysis.ERRORS_FILE
    read = staticmethod(erroranalysis.ErrorAnalysis.load)


class ErrorMatchStore(MatchStore):
    """The logged :class:`~ioulab.detector.engine.erroranalysis.ErrorMatches` of each run (what
    the breakdown's intervals resample)."""

    artifact = erroranalysis.MATCHES_FILE
    read = staticmethod(erroranalysis.ErrorMatches.load)


@dataclass
class Breakdown:
    """The breakdown's Δ intervals: variant name -> {``err/...`` metric: Interval}, and the notes
    on how they were made (or why some rows have none)."""

    intervals: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, v: Variant, metric: str):
        return self.intervals.get(v.name, {}).get(metric)


def breakdown_intervals(rows: list[Variant], base: Variant | None, fetch, resamples: int = DEFAULT_RESAMPLES,
                        seed: int = 0) -> Breakdown:
    """Paired-bootstrap intervals of every breakdown metric's Δ against the baseline, from the
    runs' ``error_matches.npz`` (``fetch(run_id)``: :class:`ErrorMatchStore`). Same image
    resamples as the results table (same ``seed`` and count: ``resample_weights`` draws first)."""
    out = Breakdown()
    if base is None or resamples <= 0 or len(rows) < 2:
        return out
    boot = Bootstrapper(fetch, resamples, seed, accumulator=erroranalysis.ErrorAccumulator)
    compare_rows(boot, base, rows, erroranalysis.METRIC_NAMES, out.intervals)
    if out.intervals:
        out.notes.append(f"Intervals: Δ against the baseline with the 95 % interval of a paired bootstrap over "
                         f"the {len(boot.image_ids or [])} validation images ({resamples} resamples, the "
                         f"results table's), the whole breakdown recomputed on each resample; * = the "
                         "interval excludes 0 (green: better, red: worse); grey: within noise.")
    if boot.missing:
        out.notes.append(f"No breakdown intervals for {len(set(boot.missing))} run(s) without a logged "
                         f"{erroranalysis.MATCHES_FILE} (evaluated before ioulab kept it, or without "
                         "detections): their Δ are differences of means.")
    out.notes += [f"No breakdown interval: {e}" for e in boot.errors]
    return out


def _cell(v: Variant, base: Variant | None, metric: str, digits: int = 1, interval=None,
          lower_is_better: bool = True) -> Cell:
    """``2.4 (−0.7 [−1.1, −0.3] *)``: the variant's mean and its Δ against the baseline (with the
    interval when there is one; green when it excludes 0 in the good direction, red in the bad,
    grey when it contains 0)."""
    value = v.mean(metric)
    if value is None:
        return fmt(None), "num"
    if base is None or v is base or base.mean(metric) is None:
        return fmt(value, digits), "num"
    delta = value - base.mean(metric)
    if interval is None:
        return f"{fmt(value, digits)} ({fmt_delta(delta, digits)})", "num"
    text, css = delta_cell(delta, interval, mark=True, digits=digits)
    if lower_is_better:   # fewer errors is the good direction: green for a fall
        css = {"pos": "neg", "neg": "pos"}.get(css, css)
    return f"{fmt(value, digits)} ({text})", css


def breakdown_table(rows: list[Variant], base: Variant | None, metrics: list[str], labels: list[str],
                    digits: int = 1, intervals: Breakdown | None = None, lower_is_better: bool = True):
    """(header, rows, classes) of ``metrics`` per variant, the baseline first."""
    iv = intervals or Breakdown()
    body = [[(v.name + (" (baseline)" if v is base else ""), "name")]
            + [_cell(v, base, m, digits, iv.get(v, m), lower_is_better) for m in metrics]
            for v in rows]
    return ["Variant", *labels], body, ["baseline" if v is base else "" for v in rows]


# The COCO-analysis gaps the verdict reads: (label, AP at the looser IoU, AP at the stricter one)
GAPS = (("C50 − C75", "AP50", "AP75"), ("C75 − C90", "AP75", "AP90"))


def _gap(v: Variant, loose: str, strict: str) -> float | None:
    """AP at the looser threshold minus AP at the stricter one (``AP50``, ``AP75``: C50 − C75 of
    COCO's analysis): boxes placed well enough for the one but not the other (localization
    error at strict IoU)."""
    a, b = v.mean(loose), v.mean(strict)
    return None if a is None or b is None else a - b


def gap_interval(results: ResultsTable | None, v: Variant, loose: str, strict: str) -> Interval | None:
    """The change of ``loose`` − ``strict`` against the baseline with the 95 % interval of the
    results table's paired bootstrap (Δloose − Δstrict on the same resamples), or None."""
    iv = results.intervals.get(v.name, {}) if results is not None else {}
    if loose not in iv or strict not in iv:
        return None
    samples = iv[loose].samples - iv[strict].samples
    low, high = np.percentile(samples, [2.5, 97.5])
    return Interval(iv[loose].delta - iv[strict].delta, float(low), float(high), samples)


def _trend(name: str, rows: list[Variant], base: Variant, value, interval=lambda v: None) -> str:
    """One sentence: ``name`` per variant (baseline first; its Δ and ``interval(v)`` after each
    value when there is one) and whether it falls below the baseline (and beyond the noise)."""
    b = value(base)
    steps = [(v, value(v)) for v in rows if v is not base and value(v) is not None]
    if b is None or not steps:
        return f"{name}: not enough variants with an error analysis to compare."
    ivs = {v.name: interval(v) for v, _ in steps}
    lower = [v.name for v, x in steps if x < b - 0.05]
    trail = " → ".join([f"{base.name} {b:.1f}"] + [
        f"{v.name} {x:.1f}" + (f" (Δ {fmt_interval(x - b, ivs[v.name])})" if ivs[v.name] is not None else "")
        for v, x in steps])
    if len(lower) == len(steps):
        verdict = "falls below the baseline in every variant"
    elif lower:
        verdict = f"falls below the baseline in {len(lower)} of {len(steps)} variants ({'; '.join(lower)})"
    else:
        verdict = "does not fall below the baseline in any variant"
    with_iv = [n for n in ivs if ivs[n] is not None]
    if with_iv:
        real = [n for n in with_iv if ivs[n].high < 0]
        verdict += (f"; beyond the noise (95 % interval below 0) in {len(real)} of {len(with_iv)}"
                    + (f" ({'; '.join(real)})" if real and len(real) < len(with_iv) else ""))
    return f"{name}: {trail}: it {verdict}."


def localization_verdict(rows: list[Variant], base: Variant | None, results: ResultsTable | None = None,
                         intervals: Breakdown | None = None) -> list[str]:
    """Does localization error fall from the baseline to the other variants? At three scales:
    TIDE's loc (IoU .1–.5, what AP50 sees), COCO's C50 − C75 and C75 − C90 (what the strict
    thresholds see: where IoU-aware inference acts), each with its bootstrap interval when there
    is one (the breakdown's, the results table's)."""
    prefix = mlflow_names.ERROR_PREFIX
    if base is None:
        return ["Localization error: no baseline with an error analysis to compare against."]
    iv = intervals or Breakdown()
    lines = [_trend("Localization error at IoU .1–.5 (TIDE loc, ΔAP50 if fixed)", rows, base,
                    lambda v: v.mean(f"{prefix}loc"), lambda v: iv.get(v, f"{prefix}loc"))]
    for label, loose, strict in GAPS:
        lines.append(_trend(f"Localization error at strict IoU (COCO {label}: AP found at "
                            f"IoU .{loose[2:]} but lost at .{strict[2:]})", rows, base,
                            lambda v, a=loose, b=strict: _gap(v, a, b),
                            lambda v, a=loose, b=strict: gap_interval(results, v, a, b)))
    return lines


def _mean_analysis(v: Variant, fetch) -> tuple[dict[str, float], list[float], list[str]] | None:
    """(class -> mean AP, mean PR curve at IoU .9, every class name in category-id order) over the
    variant's runs with ``errors.json``."""
    found = [a for a in (fetch(t.run_id) for t in v.finished) if a is not None]
    if not found:
        return None
    names = [n for n in found[0].class_ap if all(a.class_ap.get(n) is not None for a in found)]
    class_ap = {n: statistics.fmean(a.class_ap[n] for a in found) for n in names}
    curve = [statistics.fmean(a.precision["0.9"][r] for a in found) for r in range(len(found[0].recall))]
    return class_ap, curve, list(found[0].class_ap)


class ClassAP:
    """Per-class AP (IoU .50:.95, percent; NaN without ground truth) of one run's
    :class:`~ioulab.detector.engine.cocoeval.Matches` under image weights: ``acc(weights [B, I])``
    -> {``class/<k>``: [B]}, k the index in the sorted category ids (what the per-class ΔAP
    intervals resample; the interface of ``bootstrap.variant_samples``' accumulator)."""

    def __init__(self, matches, metrics):
        self.acc = cocoeval.Accumulator(matches, ("AP",))
        self.metrics = tuple(metrics)

    def __call__(self, weights=None) -> dict[str, np.ndarray]:
        ap = 100.0 * self.acc.category_ap(weights).mean(axis=1)     # [B, K]; NaN at every T alike
        return {m: ap[:, int(m.split("/", 1)[1])] for m in self.metrics}


def class_intervals(base: Variant, best: Variant, names: list[str], fetch, resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> dict[str, Interval]:
    """Class name -> the paired-bootstrap interval of its ΔAP (best − baseline), from the runs'
    ``eval_matches.npz`` (``fetch``: :class:`MatchStore`); ``names`` in sorted category-id order.
    Empty when a run has no matches or ``resamples`` is 0."""
    if resamples <= 0:
        return {}
    out: dict[str, dict] = {}
    boot = Bootstrapper(fetch, resamples, seed, accumulator=ClassAP)
    compare_rows(boot, base, [base, best], [f"class/{k}" for k in range(len(names))], out)
    return {names[int(m.split("/", 1)[1])]: iv for m, iv in out.get(best.name, {}).items()}


def class_table(base_ap: dict[str, float], best_ap: dict[str, float], limit: int = CLASS_ROWS,
                intervals: dict[str, Interval] | None = None):
    """(header, rows, classes): classes by ΔAP (best − baseline), the ``limit`` biggest gains
    then the ``limit`` biggest losses (every class when there are at most 2 x limit); with
    ``intervals`` (class -> Interval) each ΔAP carries its 95 % interval."""
    deltas = sorted(((best_ap[n] - base_ap[n], n) for n in base_ap if n in best_ap), reverse=True)
    if len(deltas) > 2 * limit:
        deltas = deltas[:limit] + deltas[-limit:]
    body = [[(n, "name"), (fmt(base_ap[n]), "num"), (fmt(best_ap[n]), "num"),
             delta_cell(d, (intervals or {}).get(n), mark=True)] for d, n in deltas]
    return ["Class", "baseline AP", "best AP", "ΔAP"], body, [""] * len(body)


def where_section(results: ResultsTable, fetch, matches_fetch=None, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = 0, eval_fetch=None) -> Section | None:
    """The section for ``results`` (None when no run of it logged an error analysis);
    ``fetch(run_id)`` returns a run's ErrorAnalysis or None (:class:`ErrorStore`);
    ``matches_fetch`` its ErrorMatches (:class:`ErrorMatchStore`; None: no breakdown intervals),
    ``eval_fetch`` its Matches (:class:`MatchStore`; None: no per-class intervals)."""
    prefix = mlflow_names.ERROR_PREFIX
    rows = [v for v in results.rows if v.mean(f"{prefix}loc") is not None]
    if not rows:
        return None
    base = results.baseline if results.baseline in rows else None
    iv = breakdown_intervals(rows, base, matches_fetch, resamples, seed) if matches_fetch else Breakdown()
    section = Section(TITLE)
    section.tables.append(("TIDE-style errors: ΔAP50 if every error of a type were fixed (Δ vs baseline)",
                           breakdown_table(rows, base, [prefix + k for k in erroranalysis.TIDE_TYPES],
                                           list(erroranalysis.TIDE_TYPES), intervals=iv)))
    section.tables.append(("Error counts (false positives by type; missed objects)",
                           breakdown_table(rows, base, [f"{prefix}n_{k}" for k in erroranalysis.TIDE_TYPES],
                                           list(erroranalysis.TIDE_TYPES), digits=0, intervals=iv)))
    section.tables.append(("COCO error analysis: AP as each kind of error is forgiven (Δ vs baseline)",
                           breakdown_table(rows, base, [f"{prefix}coco_{k.lower()}" for k in erroranalysis.COCO_STEPS],
                                           list(erroranalysis.COCO_STEPS), intervals=iv, lower_is_better=False)))
    section.notes += localization_verdict(rows, base, results, iv)
    best = results.best if results.best in rows else None
    if base is not None and best is not None:
        base_mean, best_mean = _mean_analysis(base, fetch), _mean_analysis(best, fetch)
        if base_mean is not None and best_mean is not None:
            per_class = class_intervals(base, best, base_mean[2], eval_fetch, resamples, seed) if eval_fetch else {}
            section.tables.append((f"Per-class ΔAP: {best.name} (best) − {base.name} (baseline)"
                                   + (" [95 % interval]" if per_class else ""),
                                   class_table(base_mean[0], best_mean[0], intervals=per_class)))
            recall = RECALL_THRESHOLDS.tolist()
            fig = erroranalysis.curves_figure({f"{base.name} (baseline)": (recall, base_mean[1]),
                                    f"{best.name} (best)": (recall, best_mean[1])},
                                   "precision-recall at IoU 0.9 (mean over classes)")
            section.charts.append(Chart(CHART_STEM, "Precision-recall at IoU 0.9: baseline and best",
                                        charts.png_bytes(fig)))
        else:
            section.notes.append("Per-class ΔAP and PR curves: the baseline's or best variant's runs "
                                 f"have no {erroranalysis.ERRORS_FILE} artifact.")
    section.notes += [
        "TIDE-style (Bolya et al., ECCV 2020) at IoU .5 (background below .1): cls = right box, wrong class; "
        "loc = right class, IoU in [.1, .5); both = wrong class and badly placed; dupe = a second box on "
        "a found object; bkg = nothing there; miss = an object no box claims. Lower is better.",
        "COCO error analysis (the COCO API's analyze()): C75, C50 = AP at IoU .75/.5; Loc = AP at IoU .1; "
        "Sim/Oth = confusion with a same-supercategory/any other class forgiven; BG = all false positives "
        "forgiven; FN = every object found (100).",
        "Means over each variant's finished trials. The C50 − C75 and C75 − C90 intervals come from the results "
        "table's paired resamples (AP50, AP75, AP90 on the same image draws).",
    ] + iv.notes
    return section
