"""``resources: {workers: N}`` in space files (platform/sweep/space.py) and how many multi-worker
trials run at once (driver.trial_concurrency). No Ray needed."""
import textwrap
from pathlib import Path

import pytest

from ioulab.platform.sweep.driver import trial_concurrency
from ioulab.platform.sweep.space import DDP_TRIAL_CPU, Resources, SpaceError, StageSettings, load_space


def _space(tmp_path, resources: str):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: s
        base: cpu_tiny
        grid: {{train.seed: [1, 2]}}
        metric: AP
        {resources}
        """))
    return path


def test_workers_are_per_training_trial_and_the_trial_reserves_a_token(tmp_path):
    plan = load_space(_space(tmp_path, "train: {resources: {workers: 8, cpu: 4, gpu: 1}}"))
    r = plan.train.resources
    assert (r.workers, r.cpu, r.gpu) == (8, 4, 1)
    assert r.as_tune() == {"cpu": DDP_TRIAL_CPU, "gpu": 0}  # the workers reserve the GPUs, not the trial
    assert plan.eval.resources.workers == 1
    assert load_space(_space(tmp_path, "resources: {cpu: 2}")).train.resources.as_tune() == {"cpu": 2, "gpu": 0}


@pytest.mark.parametrize("resources, message", [
    ("train: {resources: {workers: 0}}", r"train.resources.workers must be >= 1, got 0"),
    ("eval: {resources: {workers: 2}}", r"eval.resources.workers: an evaluation trial runs in one process"),
])
def test_bad_workers_name_the_key(tmp_path, resources, message):
    with pytest.raises(SpaceError, match=message):
        load_space(_space(tmp_path, resources))


def test_concurrency_follows_gpus_and_workers():
    eight = StageSettings(Resources(cpu=4, gpu=1, workers=8), concurrency=10)
    assert trial_concurrency(eight, {"CPU": 128, "GPU": 16}) == 2  # 16 GPUs / (8 workers x 1 GPU)
    assert trial_concurrency(eight, {"CPU": 40, "GPU": 16}) == 1   # CPUs bind first
    assert trial_concurrency(eight, {"CPU": 8, "GPU": 4}) == 1     # never 0: the trial waits
    one = StageSettings(Resources(cpu=1, gpu=0.25), concurrency=3)
    assert trial_concurrency(one, {"CPU": 1, "GPU": 0}) == 3       # single-process trials: as written


SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.mark.parametrize("space", sorted(p.name for p in SPACES.glob("*.yaml") if "r50:" in p.read_text()))
def test_r50_profiles_train_with_the_papers_layout(space):
    """8 workers x 1 GPU x 2 images (the papers' 16 images per iteration on 8 GPUs); evaluations in
    one process on a GPU share."""
    plan = load_space(SPACES / space, profile="r50")
    if plan.train_points:
        r = plan.train.resources
        assert (r.workers, r.gpu) == (8, 1)
        assert plan.train_config["train"]["batch_size"] // r.workers == 2
    assert plan.eval.resources.workers == 1
