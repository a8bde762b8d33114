import gzip
import json

import pytest
import torch

from ioulab.detector.engine import checkpoint_file as ckpt_io
from ioulab.detector.engine import erroranalysis
from ioulab.detector.engine.cocoeval import Accumulator, Matches
from ioulab.detector.engine.evaluate import evaluate_checkpoint, load_trained
from ioulab.detector.engine.train import NonFiniteLossError, build_optimizer, lr_factor, param_groups, train
from ioulab.detector import config as C
from ioulab.detector.engine.timing import INFER_MS_PER_IMAGE
from tests.conftest import without_timing


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
    assert set(metrics) == {"AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90", "APs", "APm", "APl",
                            INFER_MS_PER_IMAGE, *erroranalysis.METRIC_NAMES}
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
    # the final evaluation's detections and per-image matching are logged too (paired comparisons)
    detected = bool(json.loads((run / "detections.json").read_text()))
    assert sorted(rec.artifacts) == sorted(["config.yaml", "detections.json.gz", "errors.json", "eval_matches.npz",
                                            "metrics.json", "pr_curves.png"]
                                           + ["error_matches.npz"] * detected)   # none without detections
    assert rec.metrics[-1][1]["err/loc"] == metrics["err/loc"]   # where the AP goes, logged too
    assert rec.metrics[-1][1][INFER_MS_PER_IMAGE] == metrics[INFER_MS_PER_IMAGE] > 0   # and what it cost
    with gzip.open(run / "detections.json.gz", "rt") as f:
        assert json.load(f) == json.loads((run / "detections.json").read_text())
    matches = Matches.load(run / "eval_matches.npz")
    assert Accumulator(matches, ["AP", "AP50"])()["AP"][0] == pytest.approx(metrics["AP"], abs=1e-6)
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
    assert without_timing(resumed.metrics) == without_timing(straight.metrics)
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
    file_before = result.checkpoint.read_bytes()
    base_model, _, _, _ = load_trained(result.checkpoint)
    _, base_cfg = evaluate_checkpoint(result.checkpoint, out_dir=tmp_path / "base", progress=False)
    over = ["inference.score_thresh=0.01", "inference.detections_per_img=3"]
    metrics, cfg = evaluate_checkpoint(result.checkpoint, over, out_dir=tmp_path / "over", progress=False)
    assert cfg.inference.score_thresh == 0.01 and set(metrics) >= {"AP", "AP90"}
    base_dets = json.loads((tmp_path / "base" / "detections.json").read_text())
    over_dets = json.loads((tmp_path / "over" / "detections.json").read_text())
    assert base_cfg.inference.detections_per_img > 3 and len(base_dets) > len(over_dets) > 0
    per_image = {}
    for d in over_dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
    assert max(per_image.values()) <= 3
    over_model, _, _, _ = load_trained(result.checkpoint, over)
    weights = base_model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in over_model.state_dict().items())
    assert result.checkpoint.read_bytes() == file_before


def test_lr_schedule_warmup_and_steps():
    cfg = C.TrainConfig(warmup_iters=10, warmup_factor=0.1, lr_steps=[0.5, 0.75], gamma=0.1)
    f = lr_factor(cfg, 100)
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == 1.0
    assert f(49) == 1.0 and f(50) == pytest.approx(0.1) and f(75) == pytest.approx(0.01)


def test_resume_falls_back_to_newest_intact_checkpoint(tiny_cfg, tmp_path, capsys):
    straight = train(tiny_cfg(), tmp_path / "r", progress=False)
    final = ckpt_io.load(straight.checkpoint)["model"]
    newest = straight.checkpoint
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a copy cut short by a full disk
    capsys.readouterr()
    resumed = train(tiny_cfg(), tmp_path / "r", resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping unreadable checkpoint(s) model_0000004.pth" in err
    assert "resuming from model_0000002.pth" in err
    weights = ckpt_io.load(resumed.checkpoint)["model"]
    assert all(torch.equal(final[k], v) for k, v in weights.items())
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_resume_refuses_changed_train_model_data_values(tiny_cfg, tmp_path):
    run = tmp_path / "r"
    train(tiny_cfg("train.max_iters=2"), run, progress=False)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    changed = tiny_cfg("train.max_iters=2", "train.lr=0.5", "model.pool_size=5")
    with pytest.raises(ckpt_io.CheckpointError) as exc_info:
        train(changed, run, resume=True, progress=False)
    msg = str(exc_info.value)
    assert "\n" not in msg and "model_0000002.pth" in msg
    assert "train.lr (0.02 -> 0.5)" in msg and "model.pool_size (7 -> 5)" in msg
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # config.yaml too
    # Inference keys may change: the finished run is evaluated again with them.
    again = train(tiny_cfg("train.max_iters=2", "inference.detections_per_img=1"), run, resume=True, progress=False)
    assert again.iterations == 2 and "detections_per_img: 1" in (run / "config.yaml").read_text()


def test_start_removes_stale_tmp_files(tiny_cfg, tmp_path):
    ckpt_dir = tmp_path / "r" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    stale = ckpt_dir / ".model_0000002.pth.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(tiny_cfg("train.max_iters=2"), tmp_path / "r", progress=False)
    assert not stale.exists()
    assert [p.name for p in ckpt_dir.iterdir()] == ["model_0000002.pth"]


def test_open_log_keeps_each_iteration_once(tmp_path):
    from ioulab.detector.engine.train import open_log

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "loss/total": 1.0 / i}) + "\n" for i in (1, 2, 3))
                   + '{"iteration": 4, "loss/to')  # torn by a kill mid-write
    with open_log(log, 2) as f:
        f.write(json.dumps({"iteration": 3, "loss/total": 0.5}) + "\n")
    assert [json.loads(line)["iteration"] for line in log.read_text().splitlines()] == [1, 2, 3]
    with open_log(tmp_path / "new.jsonl", 0) as f:
        f.write("{}\n")
    with open_log(log, 0):
        pass
    assert log.read_text() == ""  # a fresh start (no checkpoint) drops the killed attempt's lines


class _Tiny(torch.nn.Module):
    """conv (weight, bias) -> BatchNorm -> linear (weight, bias) -> LayerNorm, a frozen parameter and
    a parameter shared by two modules."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)
        self.ln = torch.nn.LayerNorm(2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.tied = torch.nn.Linear(4, 2, bias=False)
        self.tied.weight = self.fc.weight


def _named_groups(model, **train):
    cfg = C.TrainConfig(lr=0.1, weight_decay=1e-4, **train)
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"], pytest.approx(g["lr"]))
            for g in param_groups(model, cfg)]


WEIGHTS = ["conv.weight", "fc.weight"]
BIASES = ["conv.bias", "fc.bias"]
NORMS = ["bn.bias", "bn.weight", "ln.bias", "ln.weight"]
RULES = {  # (weight_decay_1d, bias_lr_factor): [(params, weight decay, lr), ...] in group order
    ("none", 1.0): [(WEIGHTS, 1e-4, 0.1), (sorted(BIASES + NORMS), 0.0, 0.1)],  # ioulab before the key
    ("bias", 1.0): [(sorted(WEIGHTS + BIASES), 1e-4, 0.1), (NORMS, 0.0, 0.1)],  # detectron2's default
    ("all", 1.0): [(sorted(WEIGHTS + BIASES + NORMS), 1e-4, 0.1)],  # mmdetection / plain SGD
    # the DIoU code (Detectron): biases without decay at twice the LR
    ("none", 2.0): [(WEIGHTS, 1e-4, 0.1), (["bn.weight", "ln.weight"], 0.0, 0.1),
                    (sorted(BIASES + ["bn.bias", "ln.bias"]), 0.0, 0.2)],
    ("all", 2.0): [(WEIGHTS + ["bn.weight", "ln.weight"], 1e-4, 0.1),
                   (sorted(BIASES + ["bn.bias", "ln.bias"]), 1e-4, 0.2)],
}


@pytest.mark.parametrize("rule, factor", list(RULES), ids=[f"{r}-x{f:g}" for r, f in RULES])
def test_param_groups_per_weight_decay_rule(rule, factor):
    groups = _named_groups(_Tiny(), weight_decay_1d=rule, bias_lr_factor=factor)
    assert groups == [(sorted(p), wd, pytest.approx(lr)) for p, wd, lr in RULES[(rule, factor)]]


def test_rule_none_keeps_the_optimizer_layout_of_older_checkpoints():
    """Before train.weight_decay_1d: [ndim > 1 with decay, ndim <= 1 without], in named_parameters
    order, so their optimizer states load."""
    model = _Tiny()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, C.TrainConfig(weight_decay_1d="none"))
    assert [[id(p) for p in g["params"]] for g in groups] == [
        [id(p) for p in trainable if p.ndim > 1], [id(p) for p in trainable if p.ndim <= 1]]
    old = torch.optim.SGD([{"params": groups[0]["params"], "weight_decay": 1e-4},
                           {"params": groups[1]["params"], "weight_decay": 0.0}], lr=0.02, momentum=0.9)
    build_optimizer(model, C.TrainConfig(weight_decay_1d="none")).load_state_dict(old.state_dict())


@pytest.mark.parametrize("rule", ["none", "bias", "all"])
def test_weight_decay_moves_exactly_the_decayed_parameters(rule):
    """With zero loss gradients, one SGD step changes a parameter iff the rule decays it; the bias
    LR factor scales the biases' LR through the schedule."""
    model = _Tiny()
    cfg = C.TrainConfig(lr=0.1, weight_decay=0.5, weight_decay_1d=rule, bias_lr_factor=3.0)
    with torch.no_grad():
        for p in model.parameters():  # norms' biases start at 0, which decay leaves where it is
            p.fill_(1.0)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, 100))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    expected = {"none": WEIGHTS, "bias": WEIGHTS + BIASES, "all": WEIGHTS + BIASES + NORMS}[rule]
    assert moved == sorted(expected)
    scheduler.step()
    lrs = sorted({round(g["lr"] / optimizer.param_groups[0]["lr"], 9) for g in optimizer.param_groups})
    assert lrs == [1.0, 3.0] and optimizer.param_groups[0]["lr"] < cfg.lr  # warming up
