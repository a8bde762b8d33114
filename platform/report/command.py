"""`ioulab report SWEEP`: the ablation report of a sweep, read back from MLflow.

Writes ``report.md`` (+ PNG charts) and a self-contained ``report.html`` into ``--out``
(default ``reports/<sweep name>/``) and logs them under ``report/`` of the sweep's parent run, so
they show in the MLflow UI. Reads: the parent run (tags ``ioulab.varying_keys``,
``ioulab.baseline``, ``ioulab.paper``) and its child runs (``mlflow.parentRunId``); see :mod:`.runs`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from ioulab.platform import mlflow_names, ui_view
from ioulab.platform.report import charts, cost, errors, table
from ioulab.platform.report.intervals import DEFAULT_RESAMPLES, MatchStore, attach_intervals
from ioulab.platform.report.paper import paper_columns, parse_paper
from ioulab.platform.report.render import Chart, Report, results_markdown, status_line, to_html, to_markdown
from ioulab.platform.report.runs import ReportError, Sweep, load_sweep, parent_latency


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", metavar="SWEEP", help=f"sweep name (tag {mlflow_names.SWEEP}) or parent run id")
    add_tracking_argument(p)
    p.add_argument("--baseline", action="append", default=[], metavar="KEY=VALUE",
                   help="the baseline variant, repeatable; KEY is a dotted config key or a unique "
                        "suffix of one (lam=0.5). Default: the sweep's space file, else the first variant")
    p.add_argument("--out", default=None, help="output folder (default: reports/<sweep name>/)")
    p.add_argument("--latency", metavar="FILE.json", default=None,
                   help="`ioulab bench latency --json` output to render as the inference-speed table "
                        "(default: the parent run's latency.json artifact, if any)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    add_interval_arguments(p)


def add_interval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                   help="bootstrap resamples for the Δ intervals (0: no intervals)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resamples")


def add_tracking_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help=mlflow_names.TRACKING_URI_HELP)


def client_for(args):
    """A client of the store named by ``--tracking-uri`` (or the default), which must exist:
    reports only read, so a mistyped path is an error instead of a new empty store."""
    from mlflow.tracking import MlflowClient

    import ioulab.platform.tracking  # noqa: F401 - MLflow's fail-fast request settings

    uri = mlflow_names.resolve_tracking_uri(args.tracking_uri)
    check_store_exists(uri)
    return MlflowClient(uri)


def check_store_exists(uri: str) -> None:
    """Raise ReportError unless a local store (SQLite file, file store folder) is already there;
    opening a missing one would create it (and its folders). Server URIs are not checked."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not path.is_file():
            raise ReportError(f"no MLflow store at {uri}: {path} does not exist (nothing was created); "
                              "pass the --tracking-uri the sweep or run logged to")
        if not _is_mlflow_sqlite(path):
            raise ReportError(f"{path} is not an MLflow store (no MLflow tables); pass the --tracking-uri "
                              "the sweep or run logged to")
    elif uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        path = Path(unquote(urlparse(uri).path))
        if not path.is_dir():
            raise ReportError(f"no MLflow store at {uri}: {path} does not exist (nothing was created)")


def _is_mlflow_sqlite(path: Path) -> bool:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError:
        return False
    return {"experiments", "runs"} <= names


def build_report(client, sweep_name: str, baseline: list[str] | None = None,
                 latency: dict | None = None, resamples: int = DEFAULT_RESAMPLES,
                 bootstrap_seed: int = 0) -> tuple[Report, Sweep]:
    """Everything the report shows, from the sweep's runs (no files written)."""
    sweep = load_sweep(client, sweep_name)
    shown = table.result_trials(sweep.trials)
    varying = sweep.varying_keys or table.differing_keys([t.params for t in shown])
    ident = table.identity_keys(varying, shown)
    labels = table.short_labels(ident)
    variants = table.group_variants(shown, ident, labels)

    if baseline:
        known = set(ident).union(*(t.params for t in sweep.trials))
        spec, source, strict = table.parse_baseline(baseline, known), "--baseline", True
    else:
        spec, source, strict = sweep.baseline, "space file", False
    base, notes = table.choose_baseline(variants, spec, source, strict)
    if not spec and base is not None:
        notes.append(f"no baseline in the space file: the first variant, {base.name}")
    results = table.results_table(variants, base, notes=notes)
    cost.attach_cost(results, sweep.trials)
    paper = parse_paper(sweep.tags)
    if paper is not None:  # the published Δs are against the space file's baseline
        published = bool(sweep.baseline) and base is not None and bool(table.matching([base], sweep.baseline))
        results.paper = paper_columns(paper, results.rows, base, published)

    report = Report(title=f"Ablation report: {sweep.name}", table=results,
                    keys={labels[k]: k for k in ident}, trials=sweep.trials, notes=list(sweep.notes))
    report.meta = _meta(client, sweep, ident, base, source if spec else "first variant")
    report.variant_of = _variant_names(sweep, shown, variants, ident, labels)
    if any(table.is_nms_key(k) for k in ident):
        report.nms = table.nms_blocks(shown, ident, base.values if base is not None else spec)
    matches = MatchStore(client)
    if resamples > 0:
        attach_intervals(results, matches, report.nms, resamples, bootstrap_seed)
    if table.LAMBDA_KEY in ident:
        series = table.lambda_series(shown, varying)
        best = "; ".join(f"{s.label}: best λ={s.best[0]:g} (AP {s.best[1]:.1f})" for s in series)
        report.charts.append(Chart("ap_vs_lambda", "AP against λ, one line per trained model",
                                   charts.png_bytes(charts.lambda_figure(series)), best))
    if results.rows:
        report.charts.append(Chart("ap_by_iou", "AP at each IoU threshold",
                                   charts.png_bytes(charts.threshold_figure(results))))
    if base is not None and len(results.rows) > 1:
        report.charts.append(Chart("delta_ap", "ΔAP against the baseline" +
                                   (" (95 % bootstrap intervals)" if results.intervals else ""),
                                   charts.png_bytes(charts.delta_figure(results))))
    report.latency = latency if latency is not None else parent_latency(client, sweep.parent_id)
    where = errors.where_section(results, errors.ErrorStore(client), errors.ErrorMatchStore(client),
                                 resamples, bootstrap_seed, eval_fetch=matches)
    if where is not None:
        report.sections.append(where)
    return report, sweep


def _meta(client, sweep: Sweep, ident: list[str], base, source: str) -> list[tuple[str, str]]:
    meta = [("sweep", sweep.name), ("parent run", sweep.parent_id), ("tracking URI", client.tracking_uri)]
    for label, tag in (("space file", mlflow_names.SPACE_FILE), ("git commit", mlflow_names.GIT_COMMIT)):
        if sweep.tags.get(tag):
            meta.append((label, sweep.tags[tag]))
    meta.append(("varying keys", ", ".join(ident) or "none"))
    meta.append(("baseline", f"{base.name} ({source})" if base is not None else "none"))
    meta.append(("trials", status_line(sweep.trials)))
    view = _ui_view(client, sweep)
    if view is not None:
        meta.append(("MLflow UI view", view))
    return meta


def _ui_view(client, sweep: Sweep) -> str | None:
    """The link of the sweep's saved MLflow UI view (platform/ui_view.py), None without one."""
    try:
        experiment_id = client.get_run(sweep.parent_id).info.experiment_id
        return ui_view.saved_view_url(client, experiment_id, sweep.name)
    except Exception:  # a store that cannot say: the report does not need the link
        return None


def _variant_names(sweep: Sweep, shown, variants, ident, labels) -> dict[str, str]:
    """Run id -> variant name for every trial; a train trial that eval trials evaluate is named by
    its model keys only (its inference settings are the evals')."""
    names = {t.run_id: v.name for v in variants for t in v.trials}
    model_keys = [k for k in ident if not table.is_inference(k)]
    for t in sweep.trials:
        if t.run_id not in names:
            values = {k: t.params.get(k, table.MISSING) for k in (model_keys if t.stage == "train" else ident)}
            names[t.run_id] = table.variant_name(values, labels, empty="model") + \
                (" (trained model)" if t.stage == "train" else "")
    return names


CHART_STEMS = ("ap_vs_lambda", "ap_by_iou", "delta_ap", errors.CHART_STEM)


def write_report(report: Report, out: Path) -> list[Path]:
    """Write the charts, report.md and report.html; remove charts of an earlier report in ``out``
    that this one no longer has."""
    out.mkdir(parents=True, exist_ok=True)
    for stem in set(CHART_STEMS) - {c.stem for c in report.all_charts()}:
        (out / f"{stem}.png").unlink(missing_ok=True)
    paths = []
    for chart in report.all_charts():
        path = out / f"{chart.stem}.png"
        path.write_bytes(chart.png)
        paths.append(path)
    for name, text in (("report.md", to_markdown(report)), ("report.html", to_html(report))):
        (out / name).write_text(text, encoding="utf-8")
        paths.append(out / name)
    return paths


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "sweep"


def run(args) -> int:
    client = client_for(args)
    try:
        latency = json.loads(Path(args.latency).read_text()) if args.latency else None
        report, sweep = build_report(client, args.sweep, args.baseline, latency, args.resamples,
                                     args.bootstrap_seed)
    except ReportError as exc:
        print(f"ioulab report: {exc}", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        print(f"ioulab report: cannot read --latency {args.latency}: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"ioulab report: MLflow at {client.tracking_uri}: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("reports") / _safe_name(sweep.name)).resolve()
    paths = write_report(report, out)
    print(f"{report.title}\n")
    print(results_markdown(report.table))
    print(f"\n{status_line(sweep.trials)}")
    print(f"\nwrote {', '.join(p.name for p in paths)} to {out}")
    if not args.no_log:
        try:
            for path in paths:
                client.log_artifact(sweep.parent_id, str(path), artifact_path="report")
        except Exception as exc:  # artifact store unreachable: the files are written all the same
            print(f"ioulab report: could not log the report to run {sweep.parent_id}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"logged to MLflow run {sweep.parent_id} (artifacts/report/) in {client.tracking_uri}")
    return 0
