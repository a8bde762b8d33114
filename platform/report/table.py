"""Ablation tables from trials: variants, baseline, the papers' "Improvement" row, NMS and λ views.

Pure data (no MLflow, no plotting): a :class:`~ioulab.platform.report.runs.Trial` carries params as
MLflow stores them (strings) and final metrics.

Glossary:
    identity keys  the dotted config keys that name a variant (the sweep's varying keys, minus
                   replicate keys such as ``train.seed``: trials that differ only there are averaged)
    variant        the trials that share the values of the identity keys; its figures are the mean
                   over its FINISHED trials (n and std are shown in the markdown)
    baseline       the variant the Improvement row and the Δ columns are measured against
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from ioulab.platform.report.runs import ReportError, Trial

if TYPE_CHECKING:
    from ioulab.platform.report.paper import PaperColumns

TABLE_METRICS = ("AP", "AP50", "AP60", "AP70", "AP80", "AP90")  # the papers' columns
NMS_METRICS = ("AP", "AP50", "AP75", "AP90")
LAMBDA_KEY = "inference.refine.lam"
MISSING = "—"
MINUS = "\u2212"  # the true minus sign the papers print


# --------------------------------------------------------------------------------------------
# Keys and values
# --------------------------------------------------------------------------------------------
def is_replicate(key: str) -> bool:
    """Seeds: trials differing only in these are repeats of one variant."""
    return key.rsplit(".", 1)[-1] == "seed"


def is_inference(key: str) -> bool:
    return key.startswith("inference.")


def is_nms_key(key: str) -> bool:
    return key.startswith(("inference.nms.", "inference.iou_nms.")) or key == "inference.mode"


def order_keys(keys: Iterable[str]) -> list[str]:
    """Model/training keys first (they name the trained model), then inference keys; otherwise
    the given order (a sweep's varying keys come in its space file's order)."""
    return sorted(dict.fromkeys(keys), key=is_inference)


def differing_keys(param_dicts: list[dict[str, str]]) -> list[str]:
    """Keys whose value (or presence) differs among the dicts, alphabetically within the order
    of :func:`order_keys`."""
    keys = set().union(*param_dicts) if param_dicts else set()
    return order_keys(sorted(k for k in keys if len({p.get(k) for p in param_dicts}) > 1))


def short_labels(keys: list[str]) -> dict[str, str]:
    """Each key without its top-level section (``model.roi_heads.box_loss.type`` ->
    ``roi_heads.box_loss.type``, ``inference.refine.lam`` -> ``refine.lam``); the full key where
    that would be ambiguous or empty."""
    short = {k: k.split(".", 1)[1] if "." in k else k for k in keys}
    counts = Counter(short.values())
    return {k: s if counts[s] == 1 else k for k, s in short.items()}


def values_equal(param: str | None, value: Any) -> bool:
    """A param string (as MLflow stores it) against a value from JSON or the command line."""
    if param is None:
        return False
    text = str(value)
    if param == text or (param.lower() == text.lower() and text.lower() in ("true", "false", "none")):
        return True
    try:
        return float(param) == float(text)
    except ValueError:
        return False


def resolve_key(key: str, known: Iterable[str]) -> str:
    """A full dotted key, or a unique dotted suffix of one (``lam`` -> ``inference.refine.lam``)."""
    known = sorted(set(known))
    if key in known:
        return key
    hits = [k for k in known if k.endswith("." + key)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ReportError(f"--baseline key {key!r} is ambiguous: {', '.join(hits)}")
    raise ReportError(f"--baseline key {key!r} is not a param of these runs")


def _sort_value(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
@dataclass
class Variant:
    """Trials sharing the values of the identity keys."""

    values: dict[str, str]       # identity key -> param string (MISSING when absent)
    name: str
    trials: list[Trial] = field(default_factory=list)

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status == "FINISHED"]

    @property
    def n(self) -> int:
        return len(self.finished)

    def _values(self, metric: str) -> list[float]:
        vals = [t.metrics.get(metric) for t in self.finished]
        return [v for v in vals if v is not None and math.isfinite(v)]

    def mean(self, metric: str) -> float | None:
        vals = self._values(metric)
        return statistics.fmean(vals) if vals else None

    def std(self, metric: str) -> float | None:
        vals = self._values(metric)
        return statistics.stdev(vals) if len(vals) > 1 else None

    def sort_key(self) -> tuple:
        return tuple(_sort_value(v) for v in self.values.values())


def variant_name(values: dict[str, str], labels: dict[str, str], empty: str = "all trials") -> str:
    return ", ".join(f"{labels.get(k, k)}={v}" for k, v in values.items()) or empty


def group_variants(trials: list[Trial], keys: list[str], labels: dict[str, str] | None = None,
                   empty: str = "all trials") -> list[Variant]:
    """Group by the values of ``keys``; variants sorted by those values (numbers numerically)."""
    labels = labels or short_labels(keys)
    groups: dict[tuple, Variant] = {}
    for t in trials:
        values = {k: t.params.get(k, MISSING) for k in keys}
        key = tuple(values.values())
        if key not in groups:
            groups[key] = Variant(values, variant_name(values, labels, empty))
        groups[key].trials.append(t)
    return sorted(groups.values(), key=Variant.sort_key)


def result_trials(trials: list[Trial]) -> list[Trial]:
    """The trials whose metrics the tables show: eval trials, and train trials that no eval trial
    evaluates (a train trial's own metrics use the default inference settings, which one of its
    eval trials repeats)."""
    evaluated = {t.train_run_id for t in trials if t.stage == "eval" and t.train_run_id}
    return [t for t in trials if t.stage == "eval" or t.run_id not in evaluated]


def identity_keys(varying: list[str], trials: list[Trial]) -> list[str]:
    """The sweep's varying keys (else those that differ among the trials), minus replicate keys."""
    keys = varying or differing_keys([t.params for t in trials])
    return order_keys(k for k in keys if not is_replicate(k))


def matching(variants: list[Variant], spec: dict[str, Any]) -> list[Variant]:
    """Variants whose trials' params equal ``spec`` on every key of ``spec`` the params have."""
    out = []
    for v in variants:
        params = v.trials[0].params
        keys = [k for k in spec if k in params or k in v.values]
        if keys and all(values_equal(v.values.get(k, params.get(k)), spec[k]) for k in keys):
            out.append(v)
    return out


def parse_baseline(items: list[str], known_keys: Iterable[str]) -> dict[str, str]:
    """``["lam=2.0", "model.roi_heads.box_loss.type=giou"]`` -> ``{full key: value}``."""
    spec = {}
    for item in items:
        if "=" not in item:
            raise ReportError(f"--baseline expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        spec[resolve_key(key.strip(), known_keys)] = value.strip()
    return spec


def choose_baseline(variants: list[Variant], spec: dict[str, Any], source: str,
                    strict: bool) -> tuple[Variant | None, list[str]]:
    """The baseline variant for ``spec`` (given by ``source``, e.g. "--baseline"); without a
    spec, or when nothing matches and not ``strict``, the first variant with results.

    ``strict`` (the user's own --baseline) makes "no match" an error that lists the variants."""
    with_results = [v for v in variants if v.n]
    notes: list[str] = []
    if spec:
        hits = [v for v in matching(variants, spec) if v.n]
        if hits:
            if len(hits) > 1:
                notes.append(f"baseline {_spec_text(spec)} ({source}) matches {len(hits)} variants; "
                             f"using the first: {hits[0].name}")
            return hits[0], notes
        if strict:
            names = "\n".join(f"  {v.name}" for v in with_results)
            raise ReportError(f"--baseline {_spec_text(spec)} matches no variant with results; "
                              f"variants:\n{names}")
        notes.append(f"baseline {_spec_text(spec)} ({source}) matches no variant with results; "
                     "using the first variant")
    return (with_results[0] if with_results else None), notes


def _spec_text(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items())


# --------------------------------------------------------------------------------------------
# The papers' table
# --------------------------------------------------------------------------------------------
@dataclass
class ResultsTable:
    columns: tuple[str, ...]
    rows: list[Variant]                      # baseline first, then the others in key order
    baseline: Variant | None
    best: Variant | None                     # best non-baseline variant by AP
    improvement: dict[str, float] | None     # best - baseline per column
    no_results: list[Variant] = field(default_factory=list)   # variants without a finished trial
    notes: list[str] = field(default_factory=list)
    # bootstrap intervals of row - baseline (platform/report/intervals.py): variant name -> metric
    # -> Interval (``delta``, ``low``, ``high``, ``excludes_zero``); empty when unavailable
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats_notes: list[str] = field(default_factory=list)       # resolution, unavailable intervals
    paper: PaperColumns | None = None   # the paper's numbers beside ours (platform/report/paper.py)
    cost: dict[str, dict[str, float | None]] = field(default_factory=dict)  # variant -> training cost (cost.py)

    def interval(self, row: Variant, metric: str):
        return self.intervals.get(row.name, {}).get(metric)

    def improvement_interval(self, metric: str):
        return None if self.best is None else self.interval(self.best, metric)

    def delta_ap(self, row: Variant) -> float | None:
        if self.baseline is None or row is self.baseline:
            return None
        a, b = row.mean("AP"), self.baseline.mean("AP")
        return None if a is None or b is None else a - b


def results_table(variants: list[Variant], baseline: Variant | None,
                  columns: tuple[str, ...] = TABLE_METRICS, notes: list[str] | None = None) -> ResultsTable:
    rows = [v for v in variants if v.n]
    no_results = [v for v in variants if not v.n]
    if baseline is not None and baseline in rows:
        rows.remove(baseline)
        rows.insert(0, baseline)
    others = [v for v in rows if v is not baseline and v.mean("AP") is not None]
    best = max(others, key=lambda v: v.mean("AP")) if others else None
    improvement = None
    if best is not None and baseline is not None and baseline.n:
        improvement = {c: best.mean(c) - baseline.mean(c) for c in columns
                       if best.mean(c) is not None and baseline.mean(c) is not None}
    return ResultsTable(columns, rows, baseline, best, improvement, no_results, list(notes or []))


# --------------------------------------------------------------------------------------------
# λ sweep: AP against λ, one line per trained model
# --------------------------------------------------------------------------------------------
@dataclass
class Series:
    label: str
    points: list[tuple[float, float, int]]   # (λ, mean AP, n) sorted by λ

    @property
    def best(self) -> tuple[float, float, int]:
        return max(self.points, key=lambda p: p[1])


def model_key(trial: Trial, model_keys: list[str]) -> tuple:
    """What identifies the trained model behind a trial: the train run it evaluates, else the
    values of the varying non-inference keys."""
    if trial.train_run_id:
        return ("run", trial.train_run_id)
    return ("keys",) + tuple(trial.params.get(k, MISSING) for k in model_keys)


def lambda_series(trials: list[Trial], varying: list[str], metric: str = "AP") -> list[Series]:
    """One series per trained model: mean ``metric`` of its FINISHED trials at each λ."""
    model_keys = [k for k in varying if not is_inference(k)]
    labels = short_labels(model_keys)
    per_model: dict[tuple, list[Trial]] = {}
    for t in trials:
        if t.status != "FINISHED" or metric not in t.metrics:
            continue
        try:
            float(t.params[LAMBDA_KEY])
        except (KeyError, ValueError):
            continue
        per_model.setdefault(model_key(t, model_keys), []).append(t)
    series = []
    for key, ts in per_model.items():
        values = {k: ts[0].params.get(k, MISSING) for k in model_keys}
        label = variant_name(values, labels, empty="model")
        by_lam: dict[float, list[float]] = {}
        for t in ts:
            by_lam.setdefault(float(t.params[LAMBDA_KEY]), []).append(t.metrics[metric])
        points = [(lam, statistics.fmean(v), len(v)) for lam, v in sorted(by_lam.items())]
        series.append((label, key, points))
    counts = Counter(label for label, _, _ in series)
    out = [Series(f"{label} (train run {key[1][:8]})" if counts[label] > 1 and key[0] == "run" else label,
                  points) for label, key, points in series]
    return sorted(out, key=lambda s: s.label)


# --------------------------------------------------------------------------------------------
# NMS sweep: the NMS comparison, per trained model
# --------------------------------------------------------------------------------------------
@dataclass
class NmsBlock:
    model: str                 # the trained model's name ("" when there is one)
    rows: list[Variant]        # inference settings, baseline first
    baseline: Variant
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)   # as ResultsTable's

    def interval(self, row: Variant, metric: str):
        return self.intervals.get(row.name, {}).get(metric)

    def delta(self, row: Variant, metric: str) -> float | None:
        if row is self.baseline:
            return None
        a, b = row.mean(metric), self.baseline.mean(metric)
        return None if a is None or b is None else a - b


def nms_blocks(trials: list[Trial], ident: list[str], baseline_spec: dict[str, Any]) -> list[NmsBlock]:
    """Rows = inference settings (all varying inference keys), one block per trained model
    (the varying non-inference keys; replicates averaged)."""
    inf_keys = [k for k in ident if is_inference(k)]
    model_keys = [k for k in ident if not is_inference(k)]
    labels = short_labels(ident)
    inf_spec = {k: v for k, v in baseline_spec.items() if is_inference(k)}
    blocks = []
    for model in group_variants(trials, model_keys, labels, empty=""):
        settings = [v for v in group_variants(model.trials, inf_keys, labels) if v.n]
        if not settings:
            continue
        hits = matching(settings, inf_spec) if inf_spec else []
        base = hits[0] if hits else settings[0]
        blocks.append(NmsBlock(model.name, [base] + [v for v in settings if v is not base], base))
    return blocks


# --------------------------------------------------------------------------------------------
# Trial status and number formatting
# --------------------------------------------------------------------------------------------
STATUS_ORDER = ("FINISHED", "FAILED", "STOPPED", "RUNNING")


def status_counts(trials: list[Trial]) -> list[tuple[str, int]]:
    counts = Counter(t.status for t in trials)
    order = list(STATUS_ORDER) + sorted(set(counts) - set(STATUS_ORDER))
    return [(s, counts[s]) for s in order if counts[s] or s in STATUS_ORDER[:3]]


def fmt(value: float | None, digits: int = 1) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_delta(value: float | None, digits: int = 1) -> str:
    """Signed like the papers: +1.7, −0.8 (true minus), 0.0 when it rounds to zero."""
    if value is None:
        return MISSING
    text = f"{abs(value):.{digits}f}"
    if float(text) == 0:
        return text
    return ("+" if value > 0 else MINUS) + text


def fmt_interval(delta: float | None, interval, digits: int = 1) -> str:
    """``+0.3 [−1.8, +2.4]``: Δ and its 95 % bootstrap interval (just Δ without an interval)."""
    if interval is None:
        return fmt_delta(delta, digits)
    while digits < 3 and interval.excludes_zero and \
            0.0 in (float(f"{interval.low:.{digits}f}"), float(f"{interval.high:.{digits}f}")):
        digits += 1   # a real difference whose bound rounds to 0: show it with one more digit
    return f"{fmt_delta(delta, digits)} [{fmt_delta(interval.low, digits)}, {fmt_delta(interval.high, digits)}]"


def verdict(interval) -> str:
    """"real" when the 95 % interval excludes 0, else "within noise" ("" without an interval)."""
    if interval is None:
        return ""
    return "real (95 %)" if interval.excludes_zero else "within noise"


def fmt_cell(column: str, value: Any) -> str:
    """A latency-bench cell: ratios with 2 decimals, other floats with 1 (3 significant < 1)."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return MISSING
        if "ratio" in column.lower():
            return f"{value:.2f}"
        return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)
