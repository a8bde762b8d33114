"""Mixed-precision training and evaluation on CPU: ``train.amp=true`` runs torch.autocast on the
CPU (the code path CUDA AMP runs), bfloat16 without and float16 with a GradScaler."""
import json
import math

import pytest
import torch

from ioulab.detector import config as C
from ioulab.detector import model as model_package
from ioulab.detector.engine import checkpoint_file as ckpt_io
from ioulab.detector.engine import train as train_module
from ioulab.detector.engine.amp import AmpUnavailableError, amp_policy
from ioulab.detector.engine.evaluate import evaluate_checkpoint
from ioulab.detector.engine.train import train
from ioulab.detector.ops.poolers import LevelPool
from tests.conftest import TINY_OVERRIDES, without_timing

MODES = ["baseline", "iou_nms", "iou_regular_nms", "refine"]
# cpu_tiny_iounet shrunk like tests/conftest.py's tiny_cfg (whose preset is cpu_tiny).
IOUNET_TINY = ["model.iou_head.representation_size=32", "model.iou_head.roi_generator.per_img=40",
               "model.iou_head.roi_generator.table_cap=500", "train.max_iters=2",
               "inference.refine.steps=2"]


@pytest.fixture
def iounet_cfg(synth_root):
    def make(*extra: str) -> C.Config:
        return C.load_config("cpu_tiny_iounet", [f"data.root={synth_root}", *TINY_OVERRIDES,
                                                 *IOUNET_TINY, *extra])

    return make


def _spy_pooled_dtypes(monkeypatch) -> list[torch.dtype]:
    """Record the dtype of the IoU head's pooled features in every model that train() and
    evaluate_checkpoint() build."""
    seen: list[torch.dtype] = []
    build = train_module.build_model

    def build_and_spy(*args, **kwargs):
        model = build(*args, **kwargs)
        model.roi_heads.iou_predictor.pooler.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(train_module, "build_model", build_and_spy)
    monkeypatch.setattr(model_package, "build_model", build_and_spy)  # load_trained's import
    # IoU-NMS and the direct refinement pool through LevelPool (the op per level), not the module
    pool = LevelPool.pool

    def pool_and_spy(self, *args, **kwargs):
        out = pool(self, *args, **kwargs)
        seen.append(out[0].dtype)
        return out

    monkeypatch.setattr(LevelPool, "pool", pool_and_spy)
    return seen


def test_policy_defaults_and_overrides():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    default = C.TrainConfig()
    assert default.amp is None and default.amp_dtype == "bfloat16"
    assert amp_policy(default, cuda).enabled and not amp_policy(default, cpu).enabled
    on = amp_policy(C.TrainConfig(amp=True), cpu)
    assert on.enabled and on.dtype == torch.bfloat16 and not on.grad_scaler().is_enabled()
    fp16 = amp_policy(C.TrainConfig(amp=True, amp_dtype="float16"), cpu)
    assert fp16.dtype == torch.float16 and fp16.grad_scaler().is_enabled()
    assert not amp_policy(C.TrainConfig(amp=False), cuda).enabled
    assert not amp_policy(C.TrainConfig(amp_dtype="float16"), cpu).grad_scaler().is_enabled()
    with on.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with amp_policy(default, cpu).autocast():
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(AmpUnavailableError, match="train.amp=true"):
        amp_policy(C.TrainConfig(amp=True), torch.device("meta"))


def test_amp_config_keys():
    cfg = C.load_config("cpu_tiny", ["train.amp=true", "train.amp_dtype=float16"])
    assert cfg.train.amp is True and cfg.train.amp_dtype == "float16"
    assert C.load_config("cpu_tiny", ["train.amp=null"]).train.amp is None
    assert C.from_dict(C.to_dict(C.load_config("cpu_tiny"))).train.amp is None
    with pytest.raises(C.ConfigError, match="train.amp_dtype='fp8' is not one of bfloat16, float16"):
        C.load_config("cpu_tiny", ["train.amp_dtype=fp8"])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("loss", ["smooth_l1", "bce"])
def test_bfloat16_training_and_every_inference_mode(iounet_cfg, tmp_path, monkeypatch, loss):
    """The bug this guards: PrRoIPool rejected bfloat16, so every IoUNet training under AMP crashed."""
    seen = _spy_pooled_dtypes(monkeypatch)
    result = train(iounet_cfg("train.amp=true", "train.device=cpu", f"model.iou_head.loss={loss}"),
                   tmp_path / "run", progress=False)
    assert seen == [torch.bfloat16] * 2  # the training steps (the final evaluation is "baseline")
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [1, 2]
    assert all(math.isfinite(r["loss/total"]) and math.isfinite(r["loss/iou"]) for r in logged)
    state = ckpt_io.load(result.checkpoint)
    assert state["scaler"] == {}  # bfloat16: no loss scaling
    for mode in MODES:
        metrics, cfg = evaluate_checkpoint(result.checkpoint, [f"inference.mode={mode}"], progress=False)
        assert cfg.train.amp is True and all(math.isfinite(v) for v in metrics.values()), mode
    assert len(seen) > 2 and set(seen) == {torch.bfloat16}  # the IoU modes evaluated under autocast


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_float16_grad_scaler_state_survives_resume(iounet_cfg, tmp_path):
    """float16 autocast on CPU with a GradScaler: 4 iterations straight == 2, killed, resumed."""
    args = ("train.amp=true", "train.device=cpu", "train.amp_dtype=float16", "train.max_iters=4")
    straight = train(iounet_cfg(*args), tmp_path / "a", progress=False)

    class Interrupt(Exception):
        pass

    def kill_at_2(iteration, path, metrics):
        if iteration == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(iounet_cfg(*args), tmp_path / "b", on_checkpoint=kill_at_2, progress=False)
    at_2 = ckpt_io.load(ckpt_io.checkpoint_path(tmp_path / "b" / "checkpoints", 2))
    assert at_2["scaler"]["scale"] > 0 and "_growth_tracker" in at_2["scaler"]
    resumed = train(iounet_cfg(*args), tmp_path / "b", resume=True, progress=False)
    a, b = ckpt_io.load(straight.checkpoint), ckpt_io.load(resumed.checkpoint)
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert without_timing(resumed.metrics) == without_timing(straight.metrics)


def test_configs_stored_before_amp_dtype_keep_their_meaning():
    """Checkpoints and sweep plans written when ``train.amp: true`` meant "on CUDA only"."""
    old = C.to_dict(C.load_config("cpu_tiny"))
    del old["train"]["amp_dtype"]
    old["train"]["amp"] = True
    assert C.from_dict(old).train.amp is None
    old["train"]["amp"] = False
    assert C.from_dict(old).train.amp is False
    assert C.from_dict(C.to_dict(C.load_config("cpu_tiny", ["train.amp=true"]))).train.amp is True
