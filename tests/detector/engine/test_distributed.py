"""Distributed evaluation (engine/distributed.py): two gloo ranks on 127.0.0.1 each predict a shard,
rank 0 gathers and scores: detections and all ten metrics equal single-process evaluation exactly;
the forward time (a wall time) is the ranks' combined one."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ioulab.detector.engine.cocoeval import METRIC_KEYS
from ioulab.detector.engine.distributed import World, evaluate_sharded, per_rank_batch
from ioulab.detector.engine.timing import INFER_MS_PER_IMAGE
from ioulab.detector.errors import UserError
from tests.conftest import without_timing

# batches of 2 over 6 images: rank 0 predicts batches 0 and 2, rank 1 batch 1 (interleaved shards)
EVAL = ("inference.batch_size=2", "inference.score_thresh=0.0")


def _model_and_data(cfg):
    from ioulab.detector.data.datasets import build_dataset
    from ioulab.detector.engine.runtime import seed_everything
    from ioulab.detector.model import build_model

    seed_everything(0)
    val = build_dataset(cfg.data, "val")
    return build_model(cfg.model, val.num_classes, cfg.inference).eval(), val


def _rank(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    from ioulab.detector import config as C

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = C.from_dict(cfg_dict)
        model, val = _model_and_data(cfg)
        metrics = evaluate_sharded(model, val, list(val.label_to_cat_id), cfg.inference, torch.device("cpu"),
                                   World(rank, world), out_dir=out if rank == 0 else None, progress=False)
        (__import__("pathlib").Path(out) / f"returned_{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_single_process(tiny_cfg, tmp_path):
    from ioulab.detector import config as C
    from ioulab.detector.engine import erroranalysis
    from ioulab.detector.engine.evaluate import evaluate_model
    from ioulab.platform.commands.launch import free_port

    cfg = tiny_cfg(*EVAL)
    model, val = _model_and_data(cfg)
    single = evaluate_model(model, val, list(val.label_to_cat_id), cfg.inference, torch.device("cpu"),
                            out_dir=tmp_path / "single", progress=False)
    (tmp_path / "sharded").mkdir()
    mp.start_processes(_rank, args=(2, free_port(), C.to_dict(cfg), str(tmp_path / "sharded")), nprocs=2,
                       start_method="spawn")
    single_dets = json.loads((tmp_path / "single" / "detections.json").read_text())
    assert single_dets, "the untrained model must detect something for the comparison to mean anything"
    assert json.loads((tmp_path / "sharded" / "detections.json").read_text()) == single_dets
    assert list(single) == list(METRIC_KEYS) + [INFER_MS_PER_IMAGE] + list(erroranalysis.METRIC_NAMES)
    written = json.loads((tmp_path / "sharded" / "metrics.json").read_text())
    assert list(written) == list(single) and without_timing(written) == without_timing(single)
    for rank in (0, 1):  # every rank gets rank 0's metrics, equal to one process's: the ten APs and err/*
        assert json.loads((tmp_path / "sharded" / f"returned_{rank}.json").read_text()) == written


def test_global_batch_must_split_evenly():
    assert per_rank_batch(8, World(1, 2)) == 4
    with pytest.raises(UserError, match="train.batch_size=6 does not split over 4 workers"):
        per_rank_batch(6, World(0, 4))
