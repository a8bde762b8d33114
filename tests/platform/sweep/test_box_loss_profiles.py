"""The r50 profiles of the DIoU paper's spaces hold the DIoU code's box-loss settings
(``ioulab sweep ... --profile r50 --dry-run`` shows the plan these configs come from)."""
from pathlib import Path

import pytest

from ioulab.detector import config as C
from ioulab.platform.sweep.space import load_space, trial_config

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
IOU_FAMILY = ("iou", "giou", "diou", "ciou")


def _box_losses(name, profile):
    plan = load_space(SPACES / name, profile=profile)
    return {trial_config(plan, p).model.roi_heads.box_loss.type: trial_config(plan, p).model.roi_heads.box_loss
            for p in plan.train_points}


def test_box_loss_r50_uses_the_diou_codes_values():
    losses = _box_losses("box_loss.yaml", "r50")
    assert set(losses) == {"smooth_l1", *IOU_FAMILY}
    for name in IOU_FAMILY:
        assert (losses[name].weight, losses[name].frame) == (12.0, "proposal")
    assert losses["ciou"].ciou_v_grad == "reference"
    assert (losses["smooth_l1"].weight, losses["smooth_l1"].smooth_l1_beta) == (1.0, 1.0)


@pytest.mark.parametrize("profile, v_grad", [("r50", "reference"), ("cpu", "exact")])
def test_nms_trains_the_diou_codes_ciou(profile, v_grad):
    (ciou,) = _box_losses("nms.yaml", profile).values()
    assert (ciou.type, ciou.weight, ciou.frame, ciou.ciou_v_grad) == ("ciou", 12.0, "proposal", v_grad)


def test_r50_preset_is_the_iounet_reproductions_l1_baseline():
    b = C.load_config("r50_fpn_1x").model.roi_heads.box_loss
    assert (b.type, b.weight) == ("l1", 1.0)


@pytest.mark.parametrize("name", ["box_loss.yaml", "nms.yaml"])
def test_diou_r50_profiles_use_the_diou_codes_optimizer_rule(name):
    """Detectron (the DIoU code): no weight decay on biases and twice their learning rate;
    r50_fpn_1x itself follows the IoUNet reproduction (every parameter decayed, factor 1)."""
    plan = load_space(SPACES / name, profile="r50")
    for point in plan.train_points:
        train = trial_config(plan, point).train
        assert (train.weight_decay_1d, train.bias_lr_factor) == ("none", 2.0)
    preset = C.load_config("r50_fpn_1x").train
    assert (preset.weight_decay_1d, preset.bias_lr_factor) == ("all", 1.0)


@pytest.mark.parametrize("name, shown", [
    ("box_loss.yaml", ["model.roi_heads.box_loss.smooth_l1_beta=1.0", "model.roi_heads.box_loss.ciou_v_grad=reference",
                       "train.weight_decay_1d=none", "train.bias_lr_factor=2.0"]),
    ("ablation.yaml", ["model.iou_head.init=reference", "model.iou_head.roi_generator.balance=reference",
                       "inference.iou_nms.boxes=argmax", "model.roi_heads.box_loss.type=l1"]),
])
def test_dry_run_of_an_r50_profile_shows_the_papers_values(name, shown, capsys):
    from ioulab.platform.cli import main

    assert main(["sweep", str(SPACES / name), "--profile", "r50", "--dry-run"]) == 0
    (fixed,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  fixed (")]
    assert all(f" {s}," in fixed + "," for s in shown), fixed
