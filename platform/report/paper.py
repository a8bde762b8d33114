"""The paper's published numbers beside ours: the space file's ``paper:`` block, which the sweep
stores on its parent run as the tag ``ioulab.paper`` (JSON, see platform/sweep/space.py), matched
to the variants of the results table.

Glossary:
    paper row      the paper's numbers for one variant: values (metric -> percent) and/or
                   published Δs (metric -> points against the space file's baseline)
    paper ΔAP      the paper's AP of a row − the paper's AP of the row of the report's baseline;
                   else the published Δ, when the report's baseline is the space file's
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ioulab.platform.mlflow_names import PAPER
from ioulab.platform.report.table import Variant, values_equal
from ioulab.platform.sweep.space import Paper, PaperRow

SHOWN = ("AP", "AP90")  # the paper's values printed in the results table (when a row gives them)


def _numbers(data: Any) -> dict[str, float]:
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def parse_paper(tags: dict[str, str]) -> Paper | None:
    """The parent run's paper block, or None (no tag, or a tag this version cannot read)."""
    try:
        data = json.loads(tags.get(PAPER) or "null")
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        return None
    rows = [PaperRow(dict(r["variant"]), _numbers({k: v for k, v in r.items() if k not in ("variant", "delta")}),
                     _numbers(r.get("delta")))
            for r in data["rows"] if isinstance(r, dict) and isinstance(r.get("variant"), dict) and r["variant"]]
    return Paper(str(data.get("source") or "the paper"), rows) if rows else None


def names_variant(row: PaperRow, variant: Variant) -> bool:
    """True when the variant's trials hold every key of the row's variant with its value."""
    params = variant.trials[0].params if variant.trials else {}
    return all(values_equal(variant.values.get(k, params.get(k)), v) for k, v in row.variant.items())


@dataclass
class PaperColumns:
    """The paper's part of a results table: its row for each of our variants (by name)."""

    source: str
    metrics: tuple[str, ...]             # the paper values shown (of SHOWN, those some row gives)
    rows: dict[str, PaperRow]            # variant name -> the paper's row
    baseline: str | None                 # the name of our baseline variant
    published_deltas: bool               # our baseline is the space file's: published Δs apply
    unmatched: list[PaperRow] = field(default_factory=list)   # rows naming no variant with results

    def value(self, variant: Variant, metric: str) -> float | None:
        row = self.rows.get(variant.name)
        return None if row is None else row.values.get(metric)

    def delta(self, variant: Variant, metric: str = "AP") -> float | None:
        """The paper's Δ of ``variant`` against the paper's row of our baseline."""
        row, base = self.rows.get(variant.name), self.rows.get(self.baseline or "")
        if row is None or variant.name == self.baseline:
            return None
        if base is not None and metric in row.values and metric in base.values:
            return row.values[metric] - base.values[metric]
        return row.delta.get(metric) if self.published_deltas else None

    def has_row(self, variant: Variant) -> bool:
        return variant.name in self.rows


def paper_columns(paper: Paper, variants: list[Variant], baseline: Variant | None,
                  published_deltas: bool) -> PaperColumns:
    """Match every paper row to the first of ``variants`` it names (variants with results)."""
    rows, unmatched = {}, []
    for row in paper.rows:
        hit = next((v for v in variants if names_variant(row, v)), None)
        if hit is None:
            unmatched.append(row)
        else:
            rows.setdefault(hit.name, row)
    metrics = tuple(m for m in SHOWN if any(m in r.values for r in rows.values())) or ("AP",)
    return PaperColumns(paper.source, metrics, rows, baseline.name if baseline is not None else None,
                        published_deltas, unmatched)


def caption(columns: PaperColumns) -> list[str]:
    """The lines under the results table about the paper's columns."""
    out = [f"Paper: {columns.source}. paper ΔAP = the paper's AP of the row − the paper's AP of our "
           "baseline's row (or the Δ the paper publishes against it), beside our ΔAP; "
           "— = the paper has no number for the row."]
    if not columns.published_deltas and any(r.delta for r in columns.rows.values()):
        out.append("The paper's published Δs are against the space file's baseline, not this one: "
                   "only Δs computed from the paper's values are shown.")
    out += [f"Paper row {', '.join(f'{k}={v}' for k, v in r.variant.items())}: no variant with results."
            for r in columns.unmatched]
    return out
