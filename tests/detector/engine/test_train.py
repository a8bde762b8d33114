import json

import pytest
import torch

from ioulab.detector.engine import checkpoint as ckpt_io
from ioulab.detector.engine.evaluate import evaluate_checkpoint, load_trained
from ioulab.detector.engine.train import NonFiniteLossError, lr_factor, train
from ioulab.detector import config as C


class Recorder:
    def __init__(self):
        self.params, self.metrics, self.artifacts = {}, [], []

    def log_params(self, params):
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path):
        self.artifacts.append(path.name)


def test_train_writes_outputs_and_logs(tiny_cfg, tmp_path):
    rec = Recorder()
    result = train(tiny_cfg(), tmp_path / "run", logger=rec, progress=False)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90", "APs", "APm", "APl"}
    assert metrics == pytest.approx(result.metrics)
    assert isinstance(json.loads((run / "detections.json").read_text()), list)
    assert [p.name for p in ckpt_io.list_checkpoints(run / "checkpoints")] == ["model_0000002.pth", "model_0000004.pth"]
    assert rec.params["model.backbone.name"] == "tiny"
    steps = [s for s, m in rec.metrics if "loss/total" in m]
    assert steps == [1, 2, 3, 4]
    logged = rec.metrics[0][1]
    assert {"loss/classifier", "loss/box_reg", "loss/objectness", "loss/rpn_box_reg",
            "loss/box_reg_weighted", "stat/box_iou_pos", "lr"} <= set(logged)
    assert all(torch.isfinite(torch.tensor(v)) for v in logged.values())
    assert sorted(rec.artifacts) == ["config.yaml", "metrics.json"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 4


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    """4 iterations straight == killed after the checkpoint at 2, then --resume (weights, metrics)."""
    straight = train(tiny_cfg(), tmp_path / "a", progress=False)

    def kill_at_2(iteration, path, metrics):
        if iteration == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_cfg(), tmp_path / "b", on_checkpoint=kill_at_2, progress=False)
    resumed = train(tiny_cfg(), tmp_path / "b", resume=True, progress=False)
    a, b = ckpt_io.load(straight.checkpoint), ckpt_io.load(resumed.checkpoint)
    assert a["iteration"] == b["iteration"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert resumed.metrics == straight.metrics
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_existing_run_needs_resume(tiny_cfg, tmp_path):
    train(tiny_cfg("train.max_iters=2"), tmp_path / "r", progress=False)
    with pytest.raises(ckpt_io.CheckpointError, match="--resume"):
        train(tiny_cfg("train.max_iters=2"), tmp_path / "r", progress=False)


def test_nonfinite_loss_names_iteration_and_term(tiny_cfg, tmp_path, monkeypatch):
    from ioulab.detector.model import roi_heads

    calls = {"n": 0}
    original = roi_heads.BoxRegressionLoss.__call__

    def poisoned(self, *args):
        calls["n"] += 1
        loss, iou = original(self, *args)
        return (loss * float("nan") if calls["n"] == 3 else loss), iou

    monkeypatch.setattr(roi_heads.BoxRegressionLoss, "__call__", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3: loss term 'loss_box_reg' is nan"):
        train(tiny_cfg(), tmp_path / "nan", progress=False)


def test_checkpoint_loads_weights_only_and_rejects_other_config(tiny_cfg, tmp_path):
    result = train(tiny_cfg("train.max_iters=2"), tmp_path / "r", progress=False)
    # weights_only=True is what ckpt_io.load uses; a plain torch.load with it must work too.
    torch.load(result.checkpoint, weights_only=True)
    with pytest.raises(ckpt_io.CheckpointError, match=r"model.roi_heads.representation_size: checkpoint 64 vs config 128"):
        load_trained(result.checkpoint, ["model.roi_heads.representation_size=128"])
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt_io.CheckpointError, match="cannot read checkpoint"):
        ckpt_io.load(bad)
    # Inference-only overrides are fine and change the outputs, not the weights.
    metrics, cfg = evaluate_checkpoint(result.checkpoint, ["inference.score_thresh=0.9"], progress=False)
    assert cfg.inference.score_thresh == 0.9 and set(metrics) >= {"AP", "AP90"}


def test_lr_schedule_warmup_and_steps():
    cfg = C.TrainConfig(warmup_iters=10, warmup_factor=0.1, lr_steps=[0.5, 0.75], gamma=0.1)
    f = lr_factor(cfg, 100)
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(75) == pytest.approx(0.01)
