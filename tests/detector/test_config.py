import pytest

from ioulab.detector import config as C


def test_presets_load_and_differ():
    tiny, r50 = C.load_config("cpu_tiny"), C.load_config("r50_fpn_1x")
    assert tiny.model.backbone.name == "tiny" and tiny.model.min_size == 128
    assert r50.model.backbone.name == "resnet50" and (r50.model.min_size, r50.model.max_size) == (800, 1333)
    assert (r50.train.lr, r50.train.batch_size, r50.train.epochs) == (0.02, 16, 12.0)
    b = r50.model.backbone  # the papers' backbone: ImageNet weights, FrozenBatchNorm, stem + layer1 frozen
    assert (b.pretrained, b.norm, b.trainable_layers) == (True, "frozen_bn", 3)
    assert (tiny.model.backbone.pretrained, tiny.model.backbone.norm, tiny.model.backbone.trainable_layers) == \
        (False, "bn", 5)  # from scratch
    assert C.load_config(None) == tiny  # the default preset


def test_dotted_overrides_are_typed():
    cfg = C.load_config("cpu_tiny", ["model.rpn.post_nms_top_n_train=300", "train.lr=1e-3",
                                     "model.roi_heads.box_loss.type=giou", "model.anchors.sizes=[8,16,32,64,128]",
                                     "train.amp=false", "train.epochs=3"])
    assert cfg.model.rpn.post_nms_top_n_train == 300
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.roi_heads.box_loss.type == "giou"
    assert cfg.model.anchors.sizes == [8, 16, 32, 64, 128]
    assert cfg.train.amp is False and cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    # The dict form (Ray Tune's param_space) goes through the same checks.
    C.apply_overrides(cfg, {"inference.nms.beta": 0.9})
    assert cfg.inference.nms.beta == 0.9


def test_unknown_key_lists_nearest():
    with pytest.raises(C.ConfigError, match=r"unknown config key 'model.rpn.nms_thres'.*model.rpn.nms_thresh"):
        C.load_config("cpu_tiny", ["model.rpn.nms_thres=0.5"])
    with pytest.raises(C.ConfigError, match="model.roi_heads.box_los"):
        C.load_config("cpu_tiny", ["model.roi_heads.box_los.type=iou"])


@pytest.mark.parametrize("override, needle", [
    ("train.max_iters=1.5", "train.max_iters must be an integer"),
    ("train.lr=fast", "train.lr must be a number"),
    ("train.amp=3", "train.amp must be true or false"),
    ("model.anchors.sizes=5", "model.anchors.sizes must be a list"),
    ("model.roi_heads.box_loss.type=l2", "not one of smooth_l1, iou, giou, diou, ciou"),
    ("model.rpn=3", "is a section"),
    ("train.lr", "expected KEY=VALUE"),
])
def test_wrong_values_name_the_key(override, needle):
    with pytest.raises(C.ConfigError, match=needle.replace("(", r"\(")) as err:
        C.load_config("cpu_tiny", [override])
    assert "--set" in str(err.value)


def test_file_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: cpu_tiny\ntrain:\n  batch_size: eight\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml: train.batch_size must be an integer"):
        C.load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  backbone:\n    nam: tiny\n")
    with pytest.raises(C.ConfigError, match=r"typo.yaml: unknown config key 'model.backbone.nam'.*model.backbone.name"):
        C.load_config(str(typo))
    with pytest.raises(C.ConfigError, match="neither a file nor a preset"):
        C.load_config(str(tmp_path / "missing.yaml"))


def test_file_with_base_and_roundtrip(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("base: cpu_tiny\nmodel:\n  roi_heads:\n    box_loss: {type: ciou, weight: 12.0}\n")
    cfg = C.load_config(str(f), ["train.max_iters=7"])
    assert cfg.model.backbone.name == "tiny" and cfg.model.roi_heads.box_loss.weight == 12.0
    assert cfg.train.max_iters == 7
    again = C.from_dict(C.to_dict(cfg))
    assert again == cfg and not C.diff(again, cfg)
    flat = C.flatten(cfg)
    assert flat["model.roi_heads.box_loss.type"] == "ciou" and set(flat) == set(C.valid_keys())
