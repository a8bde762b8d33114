"""What a sweep's trials cost: wall time x the resources Ray gave them.

Each trial's ``seconds`` is Ray's record (the time the trainable measured, reported to Tune; see
:class:`~ioulab.platform.sweep.driver.TrialRecord`), its resources are its stage's in the space
file (what Tune reserved: ``resources: {cpu, gpu}``). Trial runs get ``cost/*`` metrics, the
parent run the sweep's totals (names in :mod:`ioulab.platform.mlflow_names`).
"""
from __future__ import annotations

from ioulab.platform import mlflow_names


def trial_cost(seconds: float, cpu: float, gpu: float) -> dict[str, float]:
    """``cost/wall_seconds``, ``cost/cpu_hours``, ``cost/gpu_hours`` of one trial."""
    hours = max(float(seconds or 0.0), 0.0) / 3600.0
    return {mlflow_names.COST_SECONDS: hours * 3600.0, mlflow_names.COST_CPU_HOURS: hours * cpu,
            mlflow_names.COST_GPU_HOURS: hours * gpu}


def record_cost(plan, record) -> dict[str, float]:
    """A :class:`TrialRecord`'s cost under its stage's resources in ``plan``."""
    resources = (plan.train if record.stage == "train" else plan.eval).resources
    return trial_cost(record.seconds, resources.cpu, resources.gpu)


def sweep_total(plan, records) -> dict[str, float]:
    """The sum over every trial (failed and stopped ones used their resources too)."""
    total = dict.fromkeys((mlflow_names.COST_SECONDS, mlflow_names.COST_CPU_HOURS, mlflow_names.COST_GPU_HOURS), 0.0)
    for rec in records:
        for key, value in record_cost(plan, rec).items():
            total[key] += value
    return total
