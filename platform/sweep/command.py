"""`ioulab sweep SPACE.yaml`: validate a search space file, then run it as Ray Tune sweep.

The whole file is checked before Ray starts (unknown keys, wrong types, values outside the allowed
set, a missing checkpoint); errors name the file and the key and exit with status 2.

One machine: a local Ray (``ray.init(address="local")``), Tune results in ``./ray_results`` and
MLflow in ``./mlflow.db``. A cluster: ``--address auto`` (or ``$RAY_ADDRESS``, as under
``ray job submit``), shared ``--storage`` and an MLflow server (``--tracking-uri``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from ioulab.platform import ui_view
from ioulab.platform.mlflow_names import TRACKING_URI_HELP
from ioulab.platform.smoke import SMOKE_OVERRIDES, add_smoke_test, announce
from ioulab.platform.sweep.space import Plan, SpaceError, describe, load_space


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("space", metavar="SPACE.yaml", help="search space file (search_spaces/)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (auto, host:port); default: $RAY_ADDRESS, else a local Ray")
    p.add_argument("--storage", default=None, metavar="PATH|URI",
                   help="Tune storage (default ./ray_results; on a cluster: shared path or s3://...)")
    p.add_argument("--tracking-uri", default=None, help=TRACKING_URI_HELP)
    p.add_argument("--experiment", default="ioulab", help="MLflow experiment name")
    p.add_argument("--name", default=None, help="sweep name (default: the file's name:, else its file name)")
    p.add_argument("--profile", default=None, help="profile of the space file (e.g. cpu, r50)")
    p.add_argument("--checkpoint", default=None, metavar="PATH|mlflow:RUN_ID",
                   help="evaluate this checkpoint instead of training (eval-only grids; replaces "
                        "the file's checkpoint: and train: stage)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, the rest resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="fixed config override for every trial, repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trials; run nothing")
    p.add_argument("--mlflow-wait", type=float, default=120.0, metavar="S",
                   help="seconds to keep retrying an unreachable MLflow at the end of the sweep")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--allow-pending", action="store_true",
                   help="start even if no node can hold a trial yet (a cluster that adds nodes on demand; "
                        "detected autoscalers need no flag): trials wait for the nodes")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the outcome as JSON")
    p.add_argument("--quiet", action="store_true", help="no Tune status table")
    add_smoke_test(p, "every trial at smoke sizes: synthetic data of 12 images, a tiny model, 4 iterations; "
                      "the sweep's name ends in -smoke-test")


def load_plan(space: str, overrides: list[str], smoke_test: bool = False, **options) -> Plan:
    """:func:`load_space`; with ``smoke_test``, every key the file does not vary at smoke sizes
    (``--set`` still wins) and ``-smoke-test`` appended to the sweep's name."""
    plan = load_space(space, overrides, **options)
    if not smoke_test:
        return plan
    varied = {key for point in (*plan.train_points, *plan.eval_points) for key in point.overrides}
    smoke = [o for o in SMOKE_OVERRIDES if o.split("=", 1)[0] not in varied]
    plan = load_space(space, [*smoke, *overrides], **options)
    plan.name = f"{plan.name}-smoke-test"
    return plan


def check_backbone_weights(plan) -> None:
    """Every training point's ImageNet weights exist here (or download now) before Ray starts;
    a missing file raises the one-line error of ``pretrained_weights``."""
    if plan.checkpoint is not None:
        return  # evaluations load trained weights
    from ioulab.detector.model.build import pretrained_weights
    from ioulab.platform.sweep.space import trial_config

    for point in plan.train_points:
        pretrained_weights(trial_config(plan, point).model)


def run(args) -> int:
    t0 = time.perf_counter()
    announce(args, "ioulab sweep")
    try:
        plan = load_plan(args.space, args.overrides, args.smoke_test, profile=args.profile, name=args.name,
                         checkpoint=args.checkpoint)
        checkpoint_ref = None
        if plan.checkpoint is not None:
            import ioulab.platform.tracking  # noqa: F401 - MLflow's fail-fast request settings
            from ioulab.platform.mlflow_names import resolve_tracking_uri
            from ioulab.platform.sweep.checkpoint_source import check_checkpoint, resolve_checkpoint

            uri = resolve_tracking_uri(args.tracking_uri)
            checkpoint_ref = resolve_checkpoint(plan.checkpoint, plan.space_file, uri)
            check_checkpoint(plan, checkpoint_ref)
    except SpaceError as exc:
        print(f"ioulab sweep: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(plan))
        return 0
    check_backbone_weights(plan)

    from ioulab.platform.sweep.driver import SweepError, SweepOptions, outcome_json, run_sweep, summary_markdown

    options = SweepOptions(address=args.address, storage=args.storage, tracking_uri=args.tracking_uri,
                           experiment=args.experiment, resume=args.resume, checkpoint_ref=checkpoint_ref,
                           mlflow_wait=args.mlflow_wait, verbose=0 if args.quiet else 1,
                           num_cpus=args.num_cpus, allow_pending=args.allow_pending)
    try:
        outcome = run_sweep(plan, options)
    except SweepError as exc:
        print(f"ioulab sweep: {exc}", file=sys.stderr)
        return 2
    print()
    print(summary_markdown(plan, outcome.trials, outcome.best))
    if outcome.best is not None:
        print(f"best: {outcome.best.stage}-{outcome.best.index:03d} {outcome.best.label} "
              f"{plan.metric} {outcome.best.metrics.get(plan.metric, float('nan')):.2f} (MLflow run {outcome.best.run_id})")
    print(f"sweep {outcome.name}: {len(outcome.trials)} trials in {time.perf_counter() - t0:.0f} s; "
          f"Tune storage {outcome.experiment_dir}")
    print(f"MLflow: parent run {outcome.parent_run_id} in {outcome.tracking_uri} (experiment {args.experiment})"
          + ("" if outcome.mlflow_complete else "  [not all records delivered yet: see warnings]"))
    view = ui_view.save_sweep_view(outcome.tracking_uri, args.experiment, plan.name, plan.varying_keys)
    if view is not None:
        served = "" if outcome.tracking_uri.startswith(("http://", "https://")) else \
            f" (after `mlflow ui --backend-store-uri {outcome.tracking_uri}`)"
        print(f"MLflow UI, this sweep's runs with the varying keys and AP…AP90 as columns: {view}{served}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(outcome_json(outcome), f, indent=2, default=str)
    return 1 if outcome.failed else 0
