"""Render a :class:`Report` as markdown (PNG charts as files beside it) and as one self-contained
HTML file (inline CSS, charts as base64 PNG data URIs, no external resources: opens offline)."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

from ioulab.platform.report import cost as cost_module
from ioulab.platform.report.paper import caption as paper_caption
from ioulab.platform.report.runs import Trial
from ioulab.platform.report.table import (MISSING, NMS_METRICS, NmsBlock, ResultsTable, fmt, fmt_cell,
                                          fmt_interval, status_counts, verdict)


@dataclass
class Chart:
    stem: str          # file name without .png
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    """A report section built elsewhere (e.g. :mod:`.errors`): tables, charts and notes, rendered
    alike in markdown and HTML. ``tables``: (subtitle, (header, rows, row classes))."""

    title: str
    tables: list[tuple[str, tuple[list[str], list[list["Cell"]], list[str]]]] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    title: str
    table: ResultsTable
    meta: list[tuple[str, str]] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)        # short label -> full dotted key
    charts: list[Chart] = field(default_factory=list)
    nms: list[NmsBlock] = field(default_factory=list)
    latency: dict[str, Any] | None = None
    trials: list[Trial] = field(default_factory=list)
    variant_of: dict[str, str] = field(default_factory=dict)  # run id -> variant name
    notes: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)   # after the charts

    def all_charts(self) -> list[Chart]:
        return self.charts + [c for s in self.sections for c in s.charts]


# --------------------------------------------------------------------------------------------
# Table model shared by both renderers: header + rows of (text, css class)
# --------------------------------------------------------------------------------------------
Cell = tuple[str, str]   # (text, class: "" | "num" | "pos" | "neg" | "noise" | "name")
SIGNIFICANT = " *"       # marks a Δ whose 95 % interval excludes 0


def delta_cell(value: float | None, interval=None, mark: bool = False, digits: int = 1) -> Cell:
    """Δ (with its interval when there is one): green/red when the interval excludes 0 (or, with
    no interval, by its sign), grey "noise" when the interval contains 0."""
    text = fmt_interval(value, interval, digits)
    if interval is not None:
        if not interval.excludes_zero:
            return text, "noise"
        text += SIGNIFICANT if mark else ""
    return text, ("pos" if text.startswith("+") else "neg" if text.startswith("\u2212") else "num")


def results_rows(table: ResultsTable, stats: bool = True) -> tuple[list[str], list[list[Cell]], list[str]]:
    """Header, body rows and row classes of the papers' table (+ ΔAP, n, std, the cost columns and
    ``ms/img`` where measured, when ``stats``; with bootstrap intervals the ΔAP column shows them
    and a "vs baseline" column says whether the difference is real)."""
    ci = bool(table.intervals)
    paper = table.paper
    header = ["Variant", *table.columns]
    if stats:
        header += ["ΔAP [95 % CI]", "vs baseline"] if ci else ["ΔAP"]
    if paper is not None:
        header += [f"paper {m}" for m in paper.metrics] + ["paper ΔAP"]
    if stats:
        header += ["n", "AP std"]
    cost = cost_columns(table) if stats else []
    header += [label for label, _ in cost]
    latency = stats and cost_module.has_latency(table)
    header += [cost_module.LATENCY_COLUMN] if latency else []
    rows, classes = [], []
    for v in table.rows:
        is_base = v is table.baseline
        cells: list[Cell] = [(v.name + (" (baseline)" if is_base else ""), "name")]
        cells += [(fmt(v.mean(c)), "num") for c in table.columns]
        if stats:
            interval = table.interval(v, "AP")
            cells += [("baseline", "num") if is_base else delta_cell(table.delta_ap(v), interval)]
            if ci:
                cells += [("", "") if is_base else (verdict(interval) or "no interval", "")]
        if paper is not None:
            cells += _paper_cells(paper, v, is_base)
        if stats:
            cells += [(str(v.n), "num"), (fmt(v.std("AP"), 2), "num")]
        cells += [(fmt(table.cost.get(v.name, {}).get(key), 3), "num") for _, key in cost]
        cells += [(fmt(cost_module.latency_ms(v)), "num")] if latency else []
        rows.append(cells)
        classes.append("baseline" if is_base else "best" if v is table.best else "")
    if table.improvement is not None:
        cells = [("Improvement", "name")]
        cells += [delta_cell(table.improvement.get(c), table.improvement_interval(c), mark=True)
                  for c in table.columns]
        if stats:
            cells += [("", "")] + ([(verdict(table.improvement_interval("AP")), "")] if ci else [])
        if paper is not None:
            cells += [("", "")] * (len(paper.metrics) + 1)
        if stats:
            cells += [("", "")] * 2
        cells += [("", "")] * (len(cost) + latency)
        rows.append(cells)
        classes.append("improvement")
    return header, rows, classes


def cost_columns(table: ResultsTable) -> list[tuple[str, str]]:
    """(header, cost key) of the training-cost columns the table has values for (GPU-hours only
    where some variant used GPUs)."""
    columns = [("train h", "wall_hours"), ("train CPU-h", "cpu_hours"), ("train GPU-h", "gpu_hours"),
               ("eval CPU-h", "eval_cpu_hours"), ("eval GPU-h", "eval_gpu_hours")]
    return [(label, key) for label, key in columns
            if any((c.get(key) or 0) > 0 for c in table.cost.values())]


def _paper_cells(paper, v, is_base: bool) -> list[Cell]:
    """The paper's values for variant ``v`` and the paper's Δ beside ours (— without a number)."""
    cells: list[Cell] = [(fmt(paper.value(v, m)), "num") for m in paper.metrics]
    if is_base:
        return cells + [("baseline" if paper.has_row(v) else MISSING, "num")]
    return cells + [delta_cell(paper.delta(v, "AP"))]


def improvement_caption(table: ResultsTable) -> str:
    if table.improvement is None:
        return ""
    text = f"Improvement = best variant by AP ({table.best.name}) − baseline ({table.baseline.name})."
    if table.intervals:
        text += (" Δ [95 % interval]: paired bootstrap over the validation images (and the seeds); "
                 f"{SIGNIFICANT.strip()} = the interval excludes 0 (a real difference), otherwise within noise. "
                 "The best of several noisy variants is biased upwards: read its interval, not its Δ.")
    return text


def nms_rows(block: NmsBlock) -> tuple[list[str], list[list[Cell]], list[str]]:
    ci = bool(block.intervals)
    header = ["Inference setting", *NMS_METRICS] + (["ΔAP [95 % CI]", "ΔAP75 [95 % CI]"] if ci else
                                                      ["ΔAP", "ΔAP75"]) + ["n"]
    rows, classes = [], []
    for v in block.rows:
        is_base = v is block.baseline
        cells: list[Cell] = [(v.name + (" (baseline)" if is_base else ""), "name")]
        cells += [(fmt(v.mean(m)), "num") for m in NMS_METRICS]
        cells += [delta_cell(block.delta(v, m), block.interval(v, m), mark=True) for m in ("AP", "AP75")]
        cells += [(str(v.n), "num")]
        rows.append(cells)
        classes.append("baseline" if is_base else "")
    return header, rows, classes


def latency_rows(payload: dict[str, Any]) -> tuple[list[str], list[list[Cell]], list[str]]:
    rows = payload.get("rows") or []
    columns = list(payload.get("columns") or (list(rows[0]) if rows else []))
    body = [[(fmt_cell(c, r.get(c)), "name" if i == 0 else "num") for i, c in enumerate(columns)]
            for r in rows]
    return columns, body, [""] * len(body)


def trial_rows(report: Report, only_unfinished: bool) -> tuple[list[str], list[list[Cell]], list[str]]:
    header = ["Trial", "Stage", "Variant", "Status", "MLflow status", "AP", "Run id"]
    body, classes = [], []
    for t in report.trials:
        if only_unfinished and t.status == "FINISHED":
            continue
        body.append([(t.name, "name"), (t.stage, ""), (report.variant_of.get(t.run_id, MISSING), ""),
                     (t.status, ""), (t.run_status, ""), (fmt(t.metrics.get("AP")), "num"),
                     (t.run_id, "mono")])
        classes.append("" if t.status == "FINISHED" else "failed")
    return header, body, classes


def status_line(trials: list[Trial]) -> str:
    counts = status_counts(trials)
    return f"{len(trials)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in counts)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _md_escape(text: str) -> str:
    """A table cell: ``|`` escaped and line breaks flattened (either would break the table)."""
    return " ".join(text.replace("|", "\\|").splitlines())


NUMERIC = ("num", "pos", "neg", "noise")


def _numeric_columns(header: list[str], rows: list[list[Cell]]) -> list[bool]:
    """A column is right-aligned when its cells are numbers (first row decides)."""
    return [bool(rows) and rows[0][i][1] in NUMERIC for i in range(len(header))]


def md_table(header: list[str], rows: list[list[Cell]], classes: list[str] | None = None) -> str:
    aligns = ["---:" if num else "---" for num in _numeric_columns(header, rows)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    for i, row in enumerate(rows):
        texts = [_md_escape(t) for t, _ in row]
        if classes and classes[i] == "improvement":
            texts[0] = f"**{texts[0]}**"
        lines.append("| " + " | ".join(texts) + " |")
    return "\n".join(lines)


def table_notes(table: ResultsTable) -> list[str]:
    """The lines under the results table: what Improvement means, variants without results, what
    ``ms/img`` is (when shown)."""
    out = [improvement_caption(table)] if table.improvement is not None else []
    if table.no_results:
        out.append("No finished trial: " + "; ".join(v.name for v in table.no_results))
    if table.paper is not None:
        out += paper_caption(table.paper)
    if cost_module.has_latency(table):
        out.append(cost_module.latency_note(table))
    return out + list(table.stats_notes) + [f"Note: {n}" for n in table.notes]


def results_markdown(table: ResultsTable) -> str:
    return "\n\n".join([md_table(*results_rows(table))] + table_notes(table))


def to_markdown(report: Report) -> str:
    out = [f"# {report.title}", ""]
    out += [f"- **{k}**: {v}" for k, v in report.meta]
    aliases = [(s, k) for s, k in report.keys.items() if s != k]
    if aliases:
        out.append("- **keys**: " + "; ".join(f"`{s}` = `{k}`" for s, k in aliases))
    out += ["", "## Results", "", results_markdown(report.table), ""]
    for chart in report.charts:
        out += [f"### {chart.title}", "", f"![{chart.title}]({chart.stem}.png)", ""]
        if chart.caption:
            out += [chart.caption, ""]
    for section in report.sections:
        out += [f"## {section.title}", ""]
        for subtitle, table in section.tables:
            out += ([f"### {subtitle}", ""] if subtitle else []) + [md_table(*table), ""]
        for chart in section.charts:
            out += [f"### {chart.title}", "", f"![{chart.title}]({chart.stem}.png)", ""]
            out += [chart.caption, ""] if chart.caption else []
        out += [f"- {n}" for n in section.notes] + ([""] if section.notes else [])
    for block in report.nms:
        out += [f"## NMS comparison{': ' + block.model if block.model else ''}", "",
                md_table(*nms_rows(block)), ""]
    if report.latency:
        out += [f"## Inference speed: {report.latency.get('title', '')}".rstrip(": "), "",
                md_table(*latency_rows(report.latency)), ""]
        out += [f"- {n}" for n in report.latency.get("notes") or []] + [""]
    if report.trials:
        out += ["## Trials", "", status_line(report.trials), ""]
        header, rows, classes = trial_rows(report, only_unfinished=True)
        if rows:
            out += ["Not finished:", "", md_table(header, rows), ""]
        out += ["<details><summary>All trials</summary>", "",
                md_table(*trial_rows(report, only_unfinished=False)[:2]), "", "</details>", ""]
    if report.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1.5em; color: #1c2025; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 0.15em 1em; color: #444; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; font-family: ui-monospace, monospace; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.95em; }
th, td { padding: 0.35em 0.8em; border-bottom: 1px solid #e3e3e3; }
th { background: #f3f5f7; text-align: left; } th.num { text-align: right; }
td.num, td.pos, td.neg, td.noise { text-align: right; font-variant-numeric: tabular-nums; }
td.noise { color: #8a8f96; } td.pos, td.neg, td.noise { white-space: nowrap; }
td.pos { color: #2e7d32; font-weight: 600; } td.neg { color: #c62828; font-weight: 600; }
td.mono { font-family: ui-monospace, monospace; font-size: 0.85em; color: #555; }
tr.baseline td { background: #f6f8fa; } tr.best td.name { font-weight: 600; }
tr.improvement td { border-top: 2px solid #333; font-weight: 600; }
tr.failed td { background: #fdecea; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { color: #555; font-size: 0.9em; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text))


def html_table(header: list[str], rows: list[list[Cell]], classes: list[str] | None = None) -> str:
    ths = "".join(f'<th class="num">{_e(h)}</th>' if num else f"<th>{_e(h)}</th>"
                  for h, num in zip(header, _numeric_columns(header, rows)))
    out = ["<table>", f"<thead><tr>{ths}</tr></thead>", "<tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        tds = "".join(f'<td class="{c}">{_e(t)}</td>' if c else f"<td>{_e(t)}</td>" for t, c in row)
        out.append(f"<tr{cls}>{tds}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _html_chart(chart: Chart) -> str:
    data = base64.b64encode(chart.png).decode("ascii")
    return (f"<h3>{_e(chart.title)}</h3>"
            f'<figure><img alt="{_e(chart.title)}" src="data:image/png;base64,{data}">'
            + (f"<figcaption>{_e(chart.caption)}</figcaption>" if chart.caption else "") + "</figure>")


def to_html(report: Report) -> str:
    body = [f"<h1>{_e(report.title)}</h1>"]
    if report.meta:
        body.append('<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in report.meta)
                    + "</dl>")
    body += ["<h2>Results</h2>", html_table(*results_rows(report.table))]
    body += [f'<p class="note">{_e(text)}</p>' for text in table_notes(report.table)]
    if any(s != k for s, k in report.keys.items()):
        body.append('<p class="note">Keys: ' + "; ".join(f"<code>{_e(s)}</code> = <code>{_e(k)}</code>"
                                                         for s, k in report.keys.items() if s != k) + "</p>")
    body += [_html_chart(chart) for chart in report.charts]
    for section in report.sections:
        body.append(f"<h2>{_e(section.title)}</h2>")
        for subtitle, table in section.tables:
            body += ([f"<h3>{_e(subtitle)}</h3>"] if subtitle else []) + [html_table(*table)]
        body += [_html_chart(chart) for chart in section.charts]
        body += [f'<p class="note">{_e(n)}</p>' for n in section.notes]
    for block in report.nms:
        body += [f"<h2>NMS comparison{': ' + _e(block.model) if block.model else ''}</h2>",
                 html_table(*nms_rows(block))]
    if report.latency:
        title = report.latency.get("title", "")
        body += [f"<h2>Inference speed{': ' + _e(title) if title else ''}</h2>",
                 html_table(*latency_rows(report.latency))]
        body += [f'<p class="note">{_e(n)}</p>' for n in report.latency.get("notes") or []]
    if report.trials:
        body += ["<h2>Trials</h2>", f"<p>{_e(status_line(report.trials))}</p>"]
        header, rows, classes = trial_rows(report, only_unfinished=True)
        if rows:
            body += ["<p>Not finished:</p>", html_table(header, rows, classes)]
        body += ["<details><summary>All trials</summary>",
                 html_table(*trial_rows(report, only_unfinished=False)), "</details>"]
    if report.notes:
        body += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(report.title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
