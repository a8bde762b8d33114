"""What a sweep's trials cost (platform/sweep/cost.py): Ray's trial seconds x the stage's resources."""
from types import SimpleNamespace

import pytest

from ioulab.platform.sweep import cost
from ioulab.platform.sweep.space import Resources, StageSettings


def test_trial_and_sweep_cost_by_hand():
    plan = SimpleNamespace(train=StageSettings(Resources(cpu=2, gpu=0.5), 1), eval=StageSettings(Resources(cpu=1, gpu=0), 2))
    records = [SimpleNamespace(stage="train", seconds=1800.0), SimpleNamespace(stage="eval", seconds=360.0),
               SimpleNamespace(stage="eval", seconds=None)]   # a trial that never reported
    assert cost.record_cost(plan, records[0]) == {"cost/wall_seconds": 1800.0, "cost/cpu_hours": 1.0,
                                                  "cost/gpu_hours": 0.25}
    total = cost.sweep_total(plan, records)
    assert total == pytest.approx({"cost/wall_seconds": 2160.0, "cost/cpu_hours": 1.1, "cost/gpu_hours": 0.25})
