"""`ioulab bench sweep`: what the sweep platform costs on top of the trials themselves.

Runs the smoke grid (``search_spaces/smoke.yaml``, or ``--space``) once, end to end (local Ray,
Tune, MLflow in a temporary SQLite store) and compares, from that one run:

    ideal  = Σ per stage (sum of the trials' compute seconds / the stage's concurrency)
    wall   = the sweep's wall time (ray.init → last MLflow record), and Tune's fit time alone
    overhead = wall / ideal − 1

A trial's compute time is measured inside the trial, from the start of the trainable to its
final report (config, data, model, training, evaluation, MLflow logging). Everything else — Ray
start, actor start and imports, scheduling, checkpoint copies, the driver's MLflow work — is
platform overhead. Target: ≤ 10 %.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ioulab.platform.bench.common import BenchResult
from ioulab.platform.smoke import add_smoke_test

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "smoke.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", default=str(DEFAULT_SPACE), help="space file (default: search_spaces/smoke.yaml)")
    p.add_argument("--profile", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", default=None, help="Ray cluster (default: a local Ray)")
    p.add_argument("--storage", default=None, help="Tune storage (default: a temporary folder)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: a temporary SQLite file)")
    p.add_argument("--num-cpus", type=int, default=None)
    add_smoke_test(p, "every trial at smoke sizes: synthetic data of 12 images, a tiny model, 4 iterations")


def run(args) -> BenchResult:
    from ioulab.platform.sweep.driver import SweepOptions, run_sweep
    from ioulab.platform.sweep.command import load_plan

    plan = load_plan(args.space, args.overrides, args.smoke_test, profile=args.profile,
                     name=f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    tmp = Path(tempfile.mkdtemp(prefix="ioulab-bench-sweep-"))
    options = SweepOptions(address=args.address, storage=args.storage or str(tmp / "ray_results"),
                           tracking_uri=args.tracking_uri or f"sqlite:///{tmp / 'mlflow.db'}",
                           experiment="ioulab-bench", verbose=0, num_cpus=args.num_cpus)
    t0 = time.perf_counter()
    outcome = run_sweep(plan, options)
    wall = time.perf_counter() - t0

    rows, ideal, fit = [], 0.0, 0.0
    for stage, settings in (("train", plan.train), ("eval", plan.eval)):
        trials = [t for t in outcome.trials if t.stage == stage]
        if not trials:
            continue
        compute = sum(t.seconds for t in trials)
        stage_ideal = compute / settings.concurrency
        ideal += stage_ideal
        fit += outcome.stage_seconds.get(stage, 0.0)
        rows.append({"stage": stage, "trials": len(trials), "concurrency": settings.concurrency,
                     "trial compute s (sum)": compute, "ideal s": stage_ideal,
                     "Tune fit s": outcome.stage_seconds.get(stage, float("nan")),
                     "overhead": outcome.stage_seconds.get(stage, float("nan")) / stage_ideal - 1})
    rows.append({"stage": "sweep (wall)", "trials": len(outcome.trials), "concurrency": "",
                 "trial compute s (sum)": sum(t.seconds for t in outcome.trials), "ideal s": ideal,
                 "Tune fit s": wall, "overhead": wall / ideal - 1})
    failed = len(outcome.failed)
    notes = [f"space {plan.space_file}: {len(outcome.trials)} trials, {failed} failed; per-trial compute "
             f"{min(t.seconds for t in outcome.trials):.1f}-{max(t.seconds for t in outcome.trials):.1f} s",
             "ideal = sum of trial compute / concurrency; overhead = wall / ideal - 1 (target <= 10 %)",
             f"sweep (wall): ray.init to the last MLflow record ({wall:.1f} s): setup (ray.init, data, "
             f"parent run) {outcome.setup_seconds:.1f} s, Tune fit {fit:.1f} s, finalize (MLflow, summary) "
             f"{outcome.finalize_seconds:.1f} s",
             f"Tune storage {outcome.experiment_dir}; MLflow {outcome.tracking_uri}"]
    return BenchResult("sweep platform overhead", ["stage", "trials", "concurrency", "trial compute s (sum)",
                                                   "ideal s", "Tune fit s", "overhead"], rows, notes,
                       extra={"wall_seconds": wall, "ideal_seconds": ideal, "fit_seconds": fit,
                              "setup_seconds": outcome.setup_seconds, "finalize_seconds": outcome.finalize_seconds,
                              "overhead": wall / ideal - 1, "failed": failed})
