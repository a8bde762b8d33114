"""Cheap guards of the config edge: ``CHOICES`` (detector/config.py) names exactly the entries of the
name → callable tables where they live (box and IoU losses, NMS types, inference modes, norms), and
the detector package loads neither Ray nor MLflow."""
import subprocess
import sys

import pytest
from torchvision.ops import batched_nms

from ioulab.detector import config as C
from ioulab.detector import losses, nms
from ioulab.detector.model import build, build_model, configure_inference, postprocess
from ioulab.detector.model.backbone import NORM_LAYERS
from ioulab.detector.model.iou_head import IOU_LOSSES

from tests.detector.model.test_iounet import TINY


def test_box_loss_types_match_the_loss_tables():
    assert set(build.BOX_LOSSES) == set(C.CHOICES["model.roi_heads.box_loss.type"])
    assert not set(losses.DELTA_LOSSES) & set(losses.BOX_LOSSES)  # one meaning per name
    assert losses.CIOU_V_GRADS == C.CHOICES["model.roi_heads.box_loss.ciou_v_grad"]


def test_iou_head_losses_and_norms_match_their_tables():
    assert set(IOU_LOSSES) == set(C.CHOICES["model.iou_head.loss"])
    assert set(NORM_LAYERS) == set(C.CHOICES["model.backbone.norm"])


@pytest.mark.parametrize("kind, fn", [("greedy", batched_nms), ("diou", nms.batched_diou_nms)])
def test_every_nms_type_builds_its_own_nms(kind, fn):
    assert C.CHOICES["inference.nms.type"] == ("greedy", "diou")
    cfg = C.InferenceConfig()
    cfg.nms.type = kind
    assert build.build_detection_nms(cfg).func is fn


def test_inference_modes_match_the_mode_table():
    assert set(postprocess.MODES) == set(C.CHOICES["inference.mode"])
    assert [m for m in postprocess.MODES if not C.mode_needs_iou_head(m)] == ["baseline"]


def test_every_inference_mode_builds_its_own_postprocess():
    cfg = C.load_config("cpu_tiny_iounet", TINY)
    model = build_model(cfg.model, 2, cfg.inference)
    kinds = {}
    for mode in C.CHOICES["inference.mode"]:
        inference = C.clone(cfg).inference
        inference.mode = mode
        kinds[mode] = type(configure_inference(model, inference).roi_heads.postprocess)
    assert len(set(kinds.values())) == len(kinds), kinds
    with pytest.raises((KeyError, ValueError)):
        configure_inference(model, C.InferenceConfig(mode="no_such_mode"))


@pytest.mark.parametrize("module", ["ioulab.detector", "ioulab.detector.config"])
def test_the_detector_imports_neither_ray_nor_mlflow(module):
    code = (f"import sys, {module}\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
            "assert not loaded, loaded\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
