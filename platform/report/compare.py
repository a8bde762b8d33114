"""`ioulab compare RUN_ID RUN_ID ...`: the papers' table for any MLflow runs.

One row per run, in the order given, named by the params that differ among the runs; the baseline
(``--baseline RUN_ID``, default the first run) comes first, and the Improvement row is the best run
by AP minus the baseline; Δ columns carry paired-bootstrap intervals when the runs logged their
per-image matching (``eval_matches.npz``). Works on sweep trials and on single ``ioulab train``
runs alike (both log dotted config keys as params and ``AP``, ``AP50``, ... as metrics).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from mlflow.exceptions import MlflowException

from ioulab.platform.report import table
from ioulab.platform.report.command import add_interval_arguments, add_tracking_argument, client_for
from ioulab.platform.report.intervals import MatchStore, attach_intervals
from ioulab.platform.report.render import results_markdown
from ioulab.platform.report.runs import ReportError, Trial, load_runs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_ID", help="MLflow run ids")
    add_tracking_argument(p)
    p.add_argument("--baseline", metavar="RUN_ID", default=None,
                   help="the baseline run (default: the first); added to the table if not listed")
    add_interval_arguments(p)


def compare_table(trials: list[Trial],
                  baseline_id: str | None = None) -> tuple[table.ResultsTable, dict[str, str]]:
    """The results table (one variant per run) and the full key of each short label."""
    keys = table.differing_keys([t.params for t in trials])
    labels = table.short_labels(keys)
    variants = []
    for t in trials:
        values = {k: t.params.get(k, table.MISSING) for k in keys}
        variants.append(table.Variant(values, table.variant_name(values, labels, empty=t.name), [t]))
    counts = Counter(v.name for v in variants)
    for v in variants:  # identical params (e.g. repeats): tell the rows apart by run
        if counts[v.name] > 1:
            v.name = f"{v.name} [{v.trials[0].name}]"
    base_id = baseline_id or trials[0].run_id
    base = next(v for v in variants if v.trials[0].run_id == base_id)
    notes = [] if base.n else [f"the baseline run {base_id} did not finish: no Improvement row"]
    return table.results_table(variants, base if base.n else None, notes=notes), {labels[k]: k for k in keys}


def run(args) -> int:
    client = client_for(args)
    ids = list(dict.fromkeys(args.runs))
    if args.baseline and args.baseline not in ids:
        ids.insert(0, args.baseline)
    try:
        trials = load_runs(client, ids)
    except ReportError as exc:
        print(f"ioulab compare: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"ioulab compare: MLflow at {client.tracking_uri}: {exc}", file=sys.stderr)
        return 2
    results, keys = compare_table(trials, args.baseline)
    if args.resamples > 0:
        attach_intervals(results, MatchStore(client), resamples=args.resamples, seed=args.bootstrap_seed)
    print(results_markdown(results))
    aliases = [f"{s} = {k}" for s, k in keys.items() if s != k]
    if aliases:
        print("\nkeys: " + "; ".join(aliases))
    by_id = {t.run_id: t for t in trials}
    print("\nruns:")
    for v in results.rows + results.no_results:
        t = v.trials[0]
        print(f"  {v.name}: {t.run_id} ({by_id[t.run_id].run_status})")
    return 0
