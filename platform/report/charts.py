"""Report charts as matplotlib Figures (object API on the Agg canvas: no pyplot global state).

Each builder returns the Figure so tests can inspect it (e.g. ``fig.axes[0].get_lines()``);
:func:`png_bytes` renders one for the markdown (a file) and the HTML (a data URI).
"""
from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ioulab.platform.report.table import LAMBDA_KEY, ResultsTable, Series

THRESHOLDS = (("AP50", 50), ("AP60", 60), ("AP70", 70), ("AP80", 80), ("AP90", 90))
MAX_LINES = 10
GOOD, BAD, BASE, NOISE = "#2e7d32", "#c62828", "#546e7a", "#9e9e9e"


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def lambda_figure(series: list[Series], metric: str = "AP") -> Figure:
    """``metric`` against the refinement step λ, one line per trained model; a star marks each
    line's best λ."""
    fig = _figure()
    ax = fig.add_subplot()
    for s in series:
        lams = [p[0] for p in s.points]
        aps = [p[1] for p in s.points]
        best_lam, best_ap, _ = s.best
        (line,) = ax.plot(lams, aps, marker="o", label=f"{s.label} (best λ={best_lam:g}: {best_ap:.1f})")
        ax.scatter([best_lam], [best_ap], marker="*", s=180, color=line.get_color(), zorder=3)
    lams = sorted({p[0] for s in series for p in s.points})
    if lams and lams[0] > 0 and lams[-1] / lams[0] >= 4:  # λ grids are usually geometric
        ax.set_xscale("log", base=2)
        ax.set_xticks(lams, [f"{x:g}" for x in lams])
        ax.minorticks_off()
    ax.set_xlabel(f"λ ({LAMBDA_KEY})")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} against the refinement step λ, one line per trained model")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return fig


def threshold_figure(table: ResultsTable) -> Figure:
    """AP at each IoU threshold (50…90), one line per variant (the baseline dashed): where an
    IoU-aware change helps, the gain grows with the threshold."""
    fig = _figure()
    ax = fig.add_subplot()
    rows = table.rows[:MAX_LINES]
    for row in rows:
        pts = [(x, row.mean(m)) for m, x in THRESHOLDS if row.mean(m) is not None]
        if not pts:
            continue
        style = dict(linestyle="--", color=BASE) if row is table.baseline else {}
        label = row.name + (" (baseline)" if row is table.baseline else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, **style)
    ax.set_xticks([x for _, x in THRESHOLDS])
    ax.set_xlabel("IoU threshold (%)")
    ax.set_ylabel("AP (%)")
    more = f" (first {MAX_LINES} of {len(table.rows)})" if len(table.rows) > MAX_LINES else ""
    ax.set_title(f"AP at each IoU threshold{more}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def delta_figure(table: ResultsTable) -> Figure:
    """ΔAP of every variant against the baseline, as horizontal bars (green up, red down) with
    their 95 % bootstrap intervals as error bars; a bar whose interval contains 0 is grey; the
    paper's ΔAP (when the sweep has a paper block) as a white diamond on its row."""
    rows = [r for r in table.rows if r is not table.baseline and table.delta_ap(r) is not None]
    fig = _figure(height=max(2.0, 0.35 * len(rows) + 1.2))
    ax = fig.add_subplot()
    deltas = [table.delta_ap(r) for r in rows]
    intervals = [table.interval(r, "AP") for r in rows]
    colors = [NOISE if iv is not None and not iv.excludes_zero else GOOD if d >= 0 else BAD
              for d, iv in zip(deltas, intervals)]
    ax.barh(range(len(rows)), deltas, color=colors)
    with_ci = [(i, d, iv) for i, (d, iv) in enumerate(zip(deltas, intervals)) if iv is not None]
    if with_ci:
        ys = [i for i, _, _ in with_ci]
        xs = [d for _, d, _ in with_ci]
        err = [[max(d - iv.low, 0.0) for _, d, iv in with_ci], [max(iv.high - d, 0.0) for _, d, iv in with_ci]]
        ax.errorbar(xs, ys, xerr=err, fmt="none", ecolor="black", elinewidth=1.2, capsize=4,
                    label="95 % interval (paired bootstrap)")
    paper = [(i, table.paper.delta(r)) for i, r in enumerate(rows)] if table.paper is not None else []
    paper = [(i, d) for i, d in paper if d is not None]
    if paper:
        ax.plot([d for _, d in paper], [i for i, _ in paper], "D", color="black", markerfacecolor="white",
                label="the paper's ΔAP")
    if with_ci or paper:
        ax.legend(fontsize=8, loc="best")
    ax.set_yticks(range(len(rows)), [r.name for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    base = table.baseline.name if table.baseline else "?"
    ax.set_xlabel(f"ΔAP vs baseline ({base})")
    ax.set_title("ΔAP against the baseline")
    ax.grid(axis="x", alpha=0.3)
    return fig
