"""`ioulab bench train --workers 1,2` (platform/bench/train_workers.py): one row per worker count,
timed in interleaved rounds by DDP groups of spawned processes; efficiency against the 1-worker row."""
import argparse

import pytest

from ioulab.platform.bench import train as bench_train
from ioulab.platform.bench.train_workers import parse_workers
from tests.conftest import TINY_OVERRIDES


def test_worker_list_is_checked_in_one_line():
    assert parse_workers("1,2,4") == [1, 2, 4]
    for bad in ("0,2", "two", ""):
        with pytest.raises(SystemExit, match="--workers expects whole numbers >= 1 like 1,2"):
            parse_workers(bad)


@pytest.mark.slow
def test_rows_per_worker_count_with_efficiency(synth_root):
    p = argparse.ArgumentParser()
    bench_train.add_arguments(p)
    args = p.parse_args(["--workers", "1,2", "--iters", "2", "--warmup", "1",
                         *[a for o in [f"data.root={synth_root}", *TINY_OVERRIDES] for a in ("--set", o)]])
    result = bench_train.run(args)
    assert result.columns == ["model", "workers", "s/iter", "images/s", "efficiency %"]
    assert [r["workers"] for r in result.rows] == [1, 2]
    one, two = result.rows
    assert one["efficiency %"] == pytest.approx(100.0)
    assert two["efficiency %"] == pytest.approx(100 * one["s/iter"] / two["s/iter"] / 2)
    assert all(r["s/iter"] > 0 and r["images/s"] == pytest.approx(2 / r["s/iter"]) for r in result.rows)
