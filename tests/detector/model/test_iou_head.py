"""IoU head initialisation (``model.iou_head.init``)."""
import math

import pytest
import torch

from ioulab.detector import config as C
from ioulab.detector.model import build_model
from ioulab.detector.model.iou_head import IoUHead

from tests.detector.model.test_iounet import TINY


def _std(w):
    return w.std().item()


def _xavier_std(layer):
    return math.sqrt(2.0 / (layer.in_features + layer.out_features))


def test_ioulab_init_is_unchanged_by_the_option():
    torch.manual_seed(3)
    before = IoUHead(16, 7, 256, num_classes=80)  # the constructor as it was called before the option
    torch.manual_seed(3)
    named = IoUHead(16, 7, 256, num_classes=80, init="ioulab")
    for a, b in zip(before.state_dict().values(), named.state_dict().values()):
        assert torch.equal(a, b)
    assert _std(named.out.weight) == pytest.approx(0.001, rel=0.05)
    bound = 1 / math.sqrt(named.fc1.in_features)  # PyTorch's default Linear init
    assert named.fc1.weight.abs().max().item() <= bound and named.fc1.bias.abs().max().item() > 0


@pytest.mark.parametrize("init, out_std", [("reference", None), ("reference_as_written", 0.01)])
def test_reference_inits(init, out_std):
    torch.manual_seed(0)
    head = IoUHead(16, 7, 256, num_classes=80, init=init)
    for fc in (head.fc1, head.fc2):
        assert _std(fc.weight) == pytest.approx(_xavier_std(fc), rel=0.05)
    assert _std(head.out.weight) == pytest.approx(out_std or _xavier_std(head.out), rel=0.05)
    assert all(not bool(fc.bias.any()) for fc in (head.fc1, head.fc2, head.out))


def test_init_changes_no_parameter_names_so_checkpoints_load():
    cfg = C.load_config("cpu_tiny_iounet", TINY)
    old = build_model(cfg.model, 3, cfg.inference).state_dict()
    new_cfg = C.apply_overrides(C.clone(cfg), ["model.iou_head.init=reference"])
    model = build_model(new_cfg.model, 3, new_cfg.inference)
    model.load_state_dict(old)  # strict
    assert torch.equal(model.roi_heads.iou_predictor.head.out.weight,
                       old["roi_heads.iou_predictor.head.out.weight"])
