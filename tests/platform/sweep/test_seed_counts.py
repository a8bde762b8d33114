"""CPU training grids run at least 3 seeds per variant (the report's intervals need seed noise)."""
from collections import Counter
from pathlib import Path

import pytest

from ioulab.platform.sweep.space import load_space

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
TRAINING_GRIDS = ["smoke.yaml", "box_loss.yaml", "iou_loss.yaml", "loss_weight.yaml", "roi_generation.yaml"]


@pytest.mark.parametrize("name", TRAINING_GRIDS)
def test_cpu_training_grids_have_three_seeds_per_variant(name):
    plan = load_space(SPACES / name)   # the default profile: cpu
    per_variant = Counter(tuple(sorted((k, str(v)) for k, v in p.overrides.items() if k != "train.seed"))
                          for p in plan.train_points)
    seeds = {p.overrides.get("train.seed") for p in plan.train_points}
    assert len(seeds) >= 3 and min(per_variant.values()) >= 3, per_variant
