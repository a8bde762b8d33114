"""The report's section "Where the AP goes": why AP moved, from what every evaluation logs
(:mod:`ioulab.detector.engine.erroranalysis`: the ``err/...`` metrics and ``errors.json``).

* TIDE-style ΔAP50 per variant (what fixing each error type would gain; lower = fewer such
  errors) and COCO's error analysis (AP as each kind of error is forgiven in turn), each with
  its Δ against the baseline;
* the per-class ΔAP of the best variant against the baseline, biggest gains and losses first;
* the precision-recall curves of baseline and best at IoU 0.9.

Values are means over a variant's finished trials. The breakdown has no bootstrap intervals
(the results table's Δ columns do): the notes say so.
"""
from __future__ import annotations

import statistics

import numpy as np

from ioulab.detector.engine import erroranalysis
from ioulab.detector.engine.cocoeval import RECALL_THRESHOLDS
from ioulab.platform import mlflow_names
from ioulab.platform.report import charts
from ioulab.platform.report.intervals import MatchStore
from ioulab.platform.report.render import Chart, Section
from ioulab.platform.report.table import ResultsTable, Variant, fmt, fmt_delta

TITLE = "Where the AP goes"
CHART_STEM = "pr_iou90"
CLASS_ROWS = 5           # gains and losses shown each (all classes when there are few)


class ErrorStore(MatchStore):
    """The logged :class:`~ioulab.detector.engine.erroranalysis.ErrorAnalysis` of each run."""

    artifact = erroranalysis.ERRORS_FILE
    read = staticmethod(erroranalysis.ErrorAnalysis.load)


def _cell(v: Variant, base: Variant | None, metric: str, digits: int = 1) -> tuple[str, str]:
    """``2.4 (−0.7)``: the variant's mean and its Δ against the baseline."""
    value = v.mean(metric)
    if value is None:
        return fmt(None), "num"
    if base is None or v is base or base.mean(metric) is None:
        return fmt(value, digits), "num"
    return f"{fmt(value, digits)} ({fmt_delta(value - base.mean(metric), digits)})", "num"


def breakdown_table(rows: list[Variant], base: Variant | None, metrics: list[str], labels: list[str],
                    digits: int = 1):
    """(header, rows, classes) of ``metrics`` per variant, the baseline first."""
    body = [[(v.name + (" (baseline)" if v is base else ""), "name")] + [_cell(v, base, m, digits) for m in metrics]
            for v in rows]
    return ["Variant", *labels], body, ["baseline" if v is base else "" for v in rows]


def _gap(v: Variant, prefix: str) -> float | None:
    """C50 − C75 of COCO's analysis: AP lost between IoU .5 and .75, i.e. boxes placed well
    enough for .5 but not for .75 (localization error at strict IoU)."""
    c50, c75 = v.mean(f"{prefix}coco_c50"), v.mean(f"{prefix}coco_c75")
    return None if c50 is None or c75 is None else c50 - c75


def gap_interval(results: ResultsTable, v: Variant) -> str:
    """`` (Δ −9.8 [−11.2, −8.4])``: the change of C50 − C75 against the baseline with the 95 %
    interval of the results table's paired bootstrap (ΔAP50 − ΔAP75 on the same resamples), or ""."""
    iv = results.intervals.get(v.name, {})
    if "AP50" not in iv or "AP75" not in iv:
        return ""
    samples = iv["AP50"].samples - iv["AP75"].samples
    low, high = np.percentile(samples, [2.5, 97.5])
    return f" (Δ {fmt_delta(iv['AP50'].delta - iv['AP75'].delta)} [{fmt_delta(low)}, {fmt_delta(high)}])"


def _trend(name: str, rows: list[Variant], base: Variant, value, extra=lambda v: "") -> str:
    """One sentence: ``name`` per variant (baseline first; ``extra(v)`` after each value) and
    whether it falls below the baseline."""
    b = value(base)
    steps = [(v, value(v)) for v in rows if v is not base and value(v) is not None]
    if b is None or not steps:
        return f"{name}: not enough variants with an error analysis to compare."
    lower = [v.name for v, x in steps if x < b - 0.05]
    trail = " → ".join([f"{base.name} {b:.1f}"] + [f"{v.name} {x:.1f}{extra(v)}" for v, x in steps])
    if len(lower) == len(steps):
        verdict = "falls below the baseline in every variant"
    elif lower:
        verdict = f"falls below the baseline in {len(lower)} of {len(steps)} variants ({'; '.join(lower)})"
    else:
        verdict = "does not fall below the baseline in any variant"
    return f"{name}: {trail}: it {verdict}."


def localization_verdict(rows: list[Variant], base: Variant | None, results: ResultsTable | None = None) -> list[str]:
    """Does localization error fall from the baseline to the other variants? Twice: TIDE's loc
    (IoU .1–.5, what AP50 sees) and COCO's C50 − C75 (what the strict thresholds see: where
    IoU-aware inference acts; with the results table's bootstrap intervals when it has them)."""
    prefix = mlflow_names.ERROR_PREFIX
    if base is None:
        return ["Localization error: no baseline with an error analysis to compare against."]
    return [_trend("Localization error at IoU .1–.5 (TIDE loc, ΔAP50 if fixed)", rows, base,
                   lambda v: v.mean(f"{prefix}loc")),
            _trend("Localization error at strict IoU (COCO C50 − C75: AP found at .5 but lost at .75)",
                   rows, base, lambda v: _gap(v, prefix),
                   (lambda v: gap_interval(results, v)) if results is not None else (lambda v: ""))]


def _mean_analysis(v: Variant, fetch) -> tuple[dict[str, float], list[float]] | None:
    """(class -> mean AP, mean PR curve at IoU .9) over the variant's runs with ``errors.json``."""
    found = [a for a in (fetch(t.run_id) for t in v.finished) if a is not None]
    if not found:
        return None
    names = [n for n in found[0].class_ap if all(a.class_ap.get(n) is not None for a in found)]
    class_ap = {n: statistics.fmean(a.class_ap[n] for a in found) for n in names}
    curve = [statistics.fmean(a.precision["0.9"][r] for a in found) for r in range(len(found[0].recall))]
    return class_ap, curve


def class_table(base_ap: dict[str, float], best_ap: dict[str, float], limit: int = CLASS_ROWS):
    """(header, rows, classes): classes by ΔAP (best − baseline), the ``limit`` biggest gains
    then the ``limit`` biggest losses (every class when there are at most 2 x limit)."""
    deltas = sorted(((best_ap[n] - base_ap[n], n) for n in base_ap if n in best_ap), reverse=True)
    if len(deltas) > 2 * limit:
        deltas = deltas[:limit] + deltas[-limit:]
    body = [[(n, "name"), (fmt(base_ap[n]), "num"), (fmt(best_ap[n]), "num"),
             (fmt_delta(d), "pos" if d > 0.05 else "neg" if d < -0.05 else "num")] for d, n in deltas]
    return ["Class", "baseline AP", "best AP", "ΔAP"], body, [""] * len(body)


def where_section(results: ResultsTable, fetch) -> Section | None:
    """The section for ``results`` (None when no run of it logged an error analysis);
    ``fetch(run_id)`` returns a run's ErrorAnalysis or None (:class:`ErrorStore`)."""
    prefix = mlflow_names.ERROR_PREFIX
    rows = [v for v in results.rows if v.mean(f"{prefix}loc") is not None]
    if not rows:
        return None
    base = results.baseline if results.baseline in rows else None
    section = Section(TITLE)
    section.tables.append(("TIDE-style errors: ΔAP50 if every error of a type were fixed (Δ vs baseline)",
                           breakdown_table(rows, base, [prefix + k for k in erroranalysis.TIDE_TYPES],
                                           list(erroranalysis.TIDE_TYPES))))
    section.tables.append(("Error counts (false positives by type; missed objects)",
                           breakdown_table(rows, base, [f"{prefix}n_{k}" for k in erroranalysis.TIDE_TYPES],
                                           list(erroranalysis.TIDE_TYPES), digits=0)))
    section.tables.append(("COCO error analysis: AP as each kind of error is forgiven (Δ vs baseline)",
                           breakdown_table(rows, base, [f"{prefix}coco_{k.lower()}" for k in erroranalysis.COCO_STEPS],
                                           list(erroranalysis.COCO_STEPS))))
    section.notes += localization_verdict(rows, base, results)
    best = results.best if results.best in rows else None
    if base is not None and best is not None:
        base_mean, best_mean = _mean_analysis(base, fetch), _mean_analysis(best, fetch)
        if base_mean is not None and best_mean is not None:
            section.tables.append((f"Per-class ΔAP: {best.name} (best) − {base.name} (baseline)",
                                   class_table(base_mean[0], best_mean[0])))
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
        "Means over each variant's finished trials. Bootstrap intervals: only for the change of C50 − C75 "
        "(from the results table's paired resamples); the TIDE and COCO columns have none.",
    ]
    return section
