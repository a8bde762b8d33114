"""Bootstrap intervals for the report's Δ columns, from the per-image matching every evaluation
logs (``eval_matches.npz``, see ioulab.detector.engine.evaluate.EVAL_ARTIFACTS).

For each row of a table: Δ = row − baseline with the 95 % interval of a paired bootstrap over the
validation images, two-level when a variant has several seeds (ioulab.detector.engine.bootstrap).
All rows of a table share the same image resamples. Runs without the artifact (evaluated before
ioulab logged it) leave their rows without an interval, and the table says so.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ioulab.detector.engine import bootstrap
from ioulab.detector.engine.cocoeval import Matches
from ioulab.platform.report.table import NmsBlock, ResultsTable, Variant, fmt_delta

MATCHES_ARTIFACT = "eval_matches.npz"
DEFAULT_RESAMPLES = 1000


class MatchStore:
    """The logged :class:`Matches` of each run (None when it has none), downloaded once.
    Subclasses name another ``artifact`` and how to ``read`` it."""

    artifact = MATCHES_ARTIFACT
    read = staticmethod(Matches.load)

    def __init__(self, client):
        self.client = client
        self._cache: dict[str, Matches | None] = {}

    def __call__(self, run_id: str):
        if run_id not in self._cache:
            self._cache[run_id] = self._load(run_id)
        return self._cache[run_id]

    def _load(self, run_id: str):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run otherwise
        try:
            if self.artifact not in {a.path for a in self.client.list_artifacts(run_id)}:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                return self.read(Path(self.client.download_artifacts(run_id, self.artifact, tmp)))
        except Exception:  # unreachable artifact store, unreadable file: no interval for this run
            return None


class Bootstrapper:
    """Variant samples under one shared set of image resamples (computed once per variant)."""

    def __init__(self, fetch: Callable[[str], Matches | None], resamples: int, seed: int,
                 accumulator=bootstrap.Accumulator):
        self.fetch, self.resamples, self.seed, self.accumulator = fetch, resamples, seed, accumulator
        self.weights: np.ndarray | None = None
        self.image_ids: list[int] | None = None
        self.first: Matches | None = None    # every variant is checked against the first one
        self._samples: dict[int, bootstrap.VariantSamples | None] = {}
        self.missing: list[str] = []        # run ids without logged matches
        self.errors: list[str] = []

    def samples(self, v: Variant, metrics) -> bootstrap.VariantSamples | None:
        if id(v) in self._samples:
            return self._samples[id(v)]
        runs = [(t.run_id, self.fetch(t.run_id)) for t in v.finished]
        absent = [rid for rid, m in runs if m is None]
        self.missing += absent
        out = None
        if runs and not absent:
            matches = [m for _, m in runs]
            if self.weights is None:
                self.first, self.image_ids = matches[0], matches[0].image_ids
                rng = np.random.default_rng(self.seed)
                self.weights = bootstrap.resample_weights(len(self.image_ids), self.resamples, rng)
            try:
                bootstrap.check_same_images([self.first] + matches)
                rng = np.random.default_rng([self.seed, len(self._samples) + 1])
                out = bootstrap.variant_samples(matches, self.weights, metrics, rng, accumulator=self.accumulator)
            except bootstrap.BootstrapError as exc:
                self.errors.append(f"{v.name}: {exc}")
        self._samples[id(v)] = out
        return out


def attach_intervals(table: ResultsTable, fetch: Callable[[str], Matches | None], nms: list[NmsBlock] = (),
                     resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> None:
    """Fill ``table.intervals`` (and each NMS block's) and the notes on resolution/availability."""
    if table.baseline is None or len(table.rows) < 2:
        return
    boot = Bootstrapper(fetch, resamples, seed)
    # AP50, AP75, AP90: C50 − C75 and C75 − C90 in errors.py
    metrics = tuple(dict.fromkeys(("AP", *table.columns, "AP50", "AP75", "AP90")))
    compare_rows(boot, table.baseline, table.rows, metrics, table.intervals)
    for block in nms:
        compare_rows(boot, block.baseline, block.rows, ("AP", "AP75"), block.intervals)
    if boot.missing:
        table.stats_notes.append(
            f"Intervals unavailable for {len(set(boot.missing))} run(s) without a logged "
            f"{MATCHES_ARTIFACT} (evaluated before ioulab kept per-image results): their Δ are "
            "differences of means, not shown to exceed the noise.")
    table.stats_notes += [f"No interval: {e}" for e in boot.errors]
    if table.intervals:
        table.stats_notes += resolution_notes(table, resamples, len(boot.image_ids or []))


def compare_rows(boot: Bootstrapper, baseline: Variant, rows: list[Variant], metrics, out: dict) -> None:
    base = boot.samples(baseline, metrics)
    if base is None:  # nothing to compare with: only note which rows lack the artifact too
        boot.missing += [t.run_id for v in rows for t in v.finished if boot.fetch(t.run_id) is None]
        return
    for row in rows:
        if row is baseline:
            continue
        s = boot.samples(row, metrics)
        if s is not None:
            out[row.name] = bootstrap.compare(base, s)


def _seed_variance(table: ResultsTable) -> tuple[float | None, int]:
    """Pooled variance of AP across seeds within the variants (None with one seed each), and the
    smallest number of seeds of a row."""
    num, den = 0.0, 0
    for v in table.rows:
        values = [t.metrics["AP"] for t in v.finished if "AP" in t.metrics]
        if len(values) > 1:
            num += statistics.variance(values) * (len(values) - 1)
            den += len(values) - 1
    return (num / den if den else None), min(v.n for v in table.rows)


def resolution_notes(table: ResultsTable, resamples: int, num_images: int) -> list[str]:
    """What this design can tell apart: the smallest ΔAP it resolves, and the seeds the smallest
    reported ΔAP would need."""
    # the image noise of comparisons without a real effect (a real effect adds its own spread)
    null = [iv["AP"] for iv in table.intervals.values() if "AP" in iv and not iv["AP"].excludes_zero]
    image_vars = [i.image_variance for i in null] or \
        [iv["AP"].image_variance for iv in table.intervals.values() if "AP" in iv]
    image_var = float(np.nanmedian(image_vars)) if image_vars else float("nan")
    seed_var, seeds = _seed_variance(table)
    head = (f"Intervals: paired bootstrap over the {num_images} validation images"
            f"{' and the seeds' if seed_var is not None else ''}, {resamples} resamples, 95 % percentile.")
    if not np.isfinite(image_var):
        return [head]
    if seed_var is None:
        resolvable = bootstrap.resolvable_delta(0.0, image_var, 1)
        return [head, f"With one seed per variant the intervals cover image noise only (seed noise is not "
                      f"measured): they resolve ΔAP of about ±{resolvable:.1f} or more; run several seeds "
                      "(train.seed) to include training noise."]
    resolvable = bootstrap.resolvable_delta(seed_var, image_var, seeds)
    lines = [head, f"From the observed variance (AP std across seeds {np.sqrt(seed_var):.2f}, ΔAP std "
                   f"across image resamples {np.sqrt(image_var):.2f}), {seeds} seed(s) per variant and "
                   f"{num_images} images resolve ΔAP of about ±{resolvable:.1f} or more."]
    deltas = [(abs(d), v) for v in table.rows if (d := table.delta_ap(v)) is not None and abs(d) > 0]
    if deltas:
        smallest, row = min(deltas, key=lambda dv: dv[0])
        own = table.interval(row, "AP")   # that comparison's own image noise, when it has one
        need = bootstrap.seeds_needed(smallest, seed_var, own.image_variance if own is not None else image_var)
        if need is None:
            lines.append(f"The smallest reported ΔAP ({fmt_delta(smallest, 2)}) cannot be resolved by more "
                         "seeds alone: image noise is larger than it; more validation images are needed.")
        elif need <= seeds:
            lines.append(f"The smallest reported ΔAP ({fmt_delta(smallest, 2)}) is within reach of this design "
                         f"({need} seed(s) per variant would do).")
        else:
            lines.append(f"The smallest reported ΔAP ({fmt_delta(smallest, 2)}) would need about {need} seeds "
                         "per variant to be resolved.")
    return lines
