"""What each variant's training cost, for the results table ("which trick buys how much AP, at
what cost?").

A training trial's cost is what the sweep logged on its run (``cost/cpu_hours``,
``cost/gpu_hours``, ``cost/wall_seconds``: Ray's trial time x the stage's resources, see
:mod:`ioulab.platform.sweep.cost`); a run from before those metrics has none (MLflow's start and
end times are not used: a resumed or replayed run's span is not its compute), and a table
without any cost keeps its old columns. An evaluation variant costs the
training of the model it evaluates (``ioulab.train_run_id``; unknown when the sweep was given a
checkpoint) plus its own evaluation (``eval CPU-h``). Means over the variant's trials.

Where measured, the inference side (``ms/img``): the model's forward time per image that each
evaluation logs (``time/infer_ms_per_image``, see ``detector/engine/evaluate.py:predict``), the
mean over the variant's finished trials that have it; a table in which no run has it keeps its
old columns, as without cost.
"""
from __future__ import annotations

import statistics

from ioulab.platform import mlflow_names
from ioulab.platform.report.runs import Trial
from ioulab.platform.report.table import ResultsTable, Variant

LATENCY_COLUMN = "ms/img"
KEYS = ("wall_hours", "cpu_hours", "gpu_hours")
EVAL_KEYS = ("eval_cpu_hours", "eval_gpu_hours")   # an evaluation variant's own trials
BATCH_KEY = "inference.batch_size"                 # the param the latency note quotes


def training_cost(trial: Trial) -> dict[str, float | None]:
    """{wall_hours, cpu_hours, gpu_hours} of one training run (None: not recorded)."""
    m = trial.metrics
    if mlflow_names.COST_SECONDS in m:
        return {"wall_hours": m[mlflow_names.COST_SECONDS] / 3600.0,
                "cpu_hours": m.get(mlflow_names.COST_CPU_HOURS), "gpu_hours": m.get(mlflow_names.COST_GPU_HOURS)}
    return dict.fromkeys(KEYS)


def attach_cost(results: ResultsTable, trials: list[Trial]) -> None:
    """Fill ``results.cost``: variant name -> mean training cost over its finished trials."""
    by_id = {t.run_id: t for t in trials}
    for v in results.rows:
        trained = [by_id.get(t.train_run_id) if t.stage == "eval" else t for t in v.finished]
        costs = [training_cost(t) for t in trained if t is not None]
        costs += [{"eval_cpu_hours": t.metrics.get(mlflow_names.COST_CPU_HOURS),
                   "eval_gpu_hours": t.metrics.get(mlflow_names.COST_GPU_HOURS)}
                  for t in v.finished if t.stage == "eval"]
        mean = {k: statistics.fmean(vals) if (vals := [c[k] for c in costs if c.get(k) is not None]) else None
                for k in KEYS + EVAL_KEYS}
        if any(x is not None for x in mean.values()):
            results.cost[v.name] = mean


def latency_ms(variant: Variant) -> float | None:
    """Mean forward ms per image over the variant's finished trials that logged it (None: none did)."""
    return variant.mean(mlflow_names.INFER_MS_PER_IMAGE)


def has_latency(results: ResultsTable) -> bool:
    """Whether the results table gets the ``ms/img`` column: some variant's trials measured it."""
    return any(latency_ms(v) is not None for v in results.rows)


def latency_note(results: ResultsTable) -> str:
    """What ``ms/img`` is (and is not): the line under the results table."""
    sizes = {t.params.get(BATCH_KEY) for v in results.rows for t in v.finished
             if mlflow_names.INFER_MS_PER_IMAGE in t.metrics} - {None}
    batch = f"{BATCH_KEY}={sizes.pop()}" if len(sizes) == 1 else f"the configured {BATCH_KEY}"
    return (f"{LATENCY_COLUMN}: the model's forward time per image, measured during each trial's evaluation "
            f"(mean over the variant's finished trials that logged it), at {batch}, on whatever hardware ran "
            "the trial, possibly shared with other trials at the time: not a clean latency comparison. "
            "For one, run `ioulab bench latency --checkpoint CKPT` on an idle machine.")
