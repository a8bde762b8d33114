"""Shared fixtures: a tiny synthetic dataset and a config small enough for seconds-long runs."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    from ioulab.detector.data.synth import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synth") / "data", num_train=12, num_val=6,
                              size=96, seed=0, progress=False)


TINY_OVERRIDES = [
    "model.min_size=96", "model.max_size=96",
    "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=64",
    "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=32",
    "model.roi_heads.batch_size_per_image=32", "model.roi_heads.representation_size=64",
    "model.backbone.tiny_widths=[8,16,16,16]", "model.backbone.fpn_channels=16",
    "train.batch_size=2", "train.max_iters=4", "train.warmup_iters=2", "train.log_period=1",
    "train.checkpoint_period=2", "train.keep_checkpoints=10", "data.num_workers=0",
    "inference.batch_size=3",
]


def without_timing(metrics: dict) -> dict:
    """An evaluation's metrics without its forward time (``time/infer_ms_per_image``: a wall time,
    different in every run), which must be there and positive; what is left must be reproducible."""
    from ioulab.detector.engine.timing import INFER_MS_PER_IMAGE

    assert metrics[INFER_MS_PER_IMAGE] > 0, metrics
    return {k: v for k, v in metrics.items() if k != INFER_MS_PER_IMAGE}


@pytest.fixture
def tiny_cfg(synth_root):
    """cpu_tiny shrunk further, on the session's synthetic dataset; call with extra overrides."""
    from ioulab.detector import config as C

    def make(*extra: str) -> C.Config:
        return C.load_config("cpu_tiny", [f"data.root={synth_root}", *TINY_OVERRIDES, *extra])

    return make


# Bounds for the tests that train or start servers (the default, 300 s, is in pyproject.toml). Chosen
# generously: a 2-core machine shared with other work runs these several times slower than alone.
TIMEOUTS = {"cluster": 1800, "slow": 900}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        for marker, seconds in TIMEOUTS.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.timeout(seconds))
                break
