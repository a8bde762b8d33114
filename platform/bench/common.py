"""Shared output of every `ioulab bench ...` command: one table on stdout, the same figures as JSON.

A bench module exposes ``add_arguments(parser)`` and ``run(args) -> BenchResult``; the CLI prints
``result`` with :func:`format_table` and, with ``--json FILE``, writes :func:`to_json`. Every timed
region goes through :mod:`ioulab.platform.bench.timing` (device-synchronised).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BenchResult:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.3f}"
        return f"{value:.4g}"
    return str(value)


def format_table(result: BenchResult) -> str:
    cells = [[_fmt(r.get(c, "")) for c in result.columns] for r in result.rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(result.columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(result.columns, widths))
    out = [result.title, line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    out += result.notes
    return "\n".join(out)


def to_json(result: BenchResult, path: str | os.PathLike) -> None:
    payload = {"title": result.title, "columns": result.columns, "rows": result.rows,
               "notes": result.notes, **result.extra}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
