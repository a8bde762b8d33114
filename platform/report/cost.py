"""What each variant's training cost, for the results table ("which trick buys how much AP, at
what cost?").

A training trial's cost is what the sweep logged on its run (``cost/cpu_hours``,
``cost/gpu_hours``, ``cost/wall_seconds``: Ray's trial time x the stage's resources, see
:mod:`ioulab.platform.sweep.cost`); a run from before those metrics falls back to MLflow's own
record of its wall time (end - start), without CPU / GPU hours. An evaluation variant costs the
training of the model it evaluates (``ioulab.train_run_id``). Means over the variant's trials.
"""
from __future__ import annotations

import statistics

from ioulab.platform import mlflow_names
from ioulab.platform.report.runs import Trial
from ioulab.platform.report.table import ResultsTable

KEYS = ("wall_hours", "cpu_hours", "gpu_hours")


def training_cost(trial: Trial) -> dict[str, float | None]:
    """{wall_hours, cpu_hours, gpu_hours} of one training run (None: not recorded)."""
    m = trial.metrics
    if mlflow_names.COST_SECONDS in m:
        return {"wall_hours": m[mlflow_names.COST_SECONDS] / 3600.0,
                "cpu_hours": m.get(mlflow_names.COST_CPU_HOURS), "gpu_hours": m.get(mlflow_names.COST_GPU_HOURS)}
    wall = (trial.end_time - trial.start_time) / 3.6e6 if trial.end_time and trial.start_time else 0.0
    return {"wall_hours": wall if wall > 0 else None, "cpu_hours": None, "gpu_hours": None}


def attach_cost(results: ResultsTable, trials: list[Trial]) -> None:
    """Fill ``results.cost``: variant name -> mean training cost over its finished trials."""
    by_id = {t.run_id: t for t in trials}
    for v in results.rows:
        trained = [by_id.get(t.train_run_id) if t.stage == "eval" else t for t in v.finished]
        costs = [training_cost(t) for t in trained if t is not None]
        mean = {k: statistics.fmean(vals) if (vals := [c[k] for c in costs if c[k] is not None]) else None
                for k in KEYS}
        if any(x is not None for x in mean.values()):
            results.cost[v.name] = mean
