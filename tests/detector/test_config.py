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


# -- ranges: every value checked on its own --------------------------------------------------------
OUT_OF_RANGE = [
    ("train.lr=0", "train.lr=0.0 must be > 0"),
    ("train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("train.lr=inf", "train.lr=inf must be a finite number"),
    ("train.lr=.nan", "train.lr=nan must be a finite number"),
    ("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("train.max_iters=-5", "train.max_iters=-5 must be >= 0"),
    ("train.checkpoint_period=0", "train.checkpoint_period=0 must be >= 1"),
    ("train.eval_period=-1", "train.eval_period=-1 must be >= 0"),
    ("train.log_period=0", "train.log_period=0 must be >= 1"),
    ("train.epochs=0", "train.epochs=0.0 must be > 0"),
    ("train.momentum=1", "train.momentum=1.0 must be in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be >= 0"),
    ("train.warmup_factor=0", "train.warmup_factor=0.0 must be in (0, 1]"),
    ("train.warmup_iters=-1", "train.warmup_iters=-1 must be >= 0"),
    ("train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0"),
    ("train.gamma=0", "train.gamma=0.0 must be > 0"),
    ("train.lr_steps=[0.5,1.5]", "train.lr_steps[1]=1.5 must be in [0, 1]"),
    ("train.seed=-1", "train.seed=-1 must be >= 0"),
    ("train.device=gpu", "train.device='gpu' must be auto, cpu, cuda or cuda:N"),
    ("inference.score_thresh=.nan", "inference.score_thresh=nan must be a finite number"),
    ("inference.score_thresh=-1", "inference.score_thresh=-1.0 must be in [0, 1]"),
    ("inference.score_thresh=2", "inference.score_thresh=2.0 must be in [0, 1]"),
    ("inference.detections_per_img=0", "inference.detections_per_img=0 must be >= 1"),
    ("inference.batch_size=0", "inference.batch_size=0 must be >= 1"),
    ("inference.nms.iou_threshold=1.5", "inference.nms.iou_threshold=1.5 must be in [0, 1]"),
    ("inference.nms.iou_threshold=-0.2", "inference.nms.iou_threshold=-0.2 must be in [0, 1]"),
    ("inference.iou_nms.iou_threshold=1.5", "inference.iou_nms.iou_threshold=1.5 must be in [0, 1]"),
    ("inference.refine.steps=-1", "inference.refine.steps=-1 must be >= 0"),
    ("inference.refine.lam=-0.5", "inference.refine.lam=-0.5 must be >= 0"),
    ("model.rpn.nms_thresh=1.5", "model.rpn.nms_thresh=1.5 must be in [0, 1]"),
    ("model.rpn.fg_iou_thresh=1.5", "model.rpn.fg_iou_thresh=1.5 must be in [0, 1]"),
    ("model.rpn.bg_iou_thresh=-0.2", "model.rpn.bg_iou_thresh=-0.2 must be in [0, 1]"),
    ("model.roi_heads.fg_iou_thresh=1.5", "model.roi_heads.fg_iou_thresh=1.5 must be in [0, 1]"),
    ("model.roi_heads.positive_fraction=2", "model.roi_heads.positive_fraction=2.0 must be in [0, 1]"),
    ("model.rpn.batch_size_per_image=0", "model.rpn.batch_size_per_image=0 must be >= 1"),
    ("model.min_size=0", "model.min_size=0 must be >= 1"),
    ("model.anchors.sizes=[16,32,64,128]", "model.anchors.sizes=[16, 32, 64, 128] must have 5 items"),
    ("model.anchors.aspect_ratios=[0.5,0]", "model.anchors.aspect_ratios[1]=0.0 must be > 0"),
    ("model.roi_heads.bbox_reg_weights=[10,10,-5,5]", "model.roi_heads.bbox_reg_weights[2]=-5.0 must be > 0"),
    ("model.roi_heads.box_loss.weight=-1", "model.roi_heads.box_loss.weight=-1.0 must be >= 0"),
    ("model.iou_head.loss_weight=inf", "model.iou_head.loss_weight=inf must be a finite number"),
    ("model.backbone.trainable_layers=6", "model.backbone.trainable_layers=6 must be in [0, 5]"),
    ("data.flip_prob=1.5", "data.flip_prob=1.5 must be in [0, 1]"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_are_one_line_naming_key_and_source(override, message):
    with pytest.raises(C.ConfigError) as err:
        C.load_config("cpu_tiny", [override])
    assert str(err.value) == f"--set: {message}"


def test_every_numeric_key_declares_a_range():
    """A new int/float field must say which values it takes (``limits`` next to the fields)."""
    import dataclasses
    import typing

    def numeric(tp):  # int, float, list[int], X | None, ... (bool is not numeric here)
        if tp in (int, float):
            return True
        return any(numeric(arg) for arg in typing.get_args(tp))

    def walk(obj, prefix=""):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            elif numeric(hints[f.name]):
                yield f"{prefix}{f.name}", type(obj)

    missing = [key for key, owner in walk(C.Config()) if key.rsplit(".", 1)[1] not in owner.limits]
    assert not missing, f"numeric keys without a range in their dataclass's limits: {missing}"


def test_every_float_key_rejects_nan_and_inf():
    floats = [k for k, v in C.flatten(C.Config()).items() if isinstance(v, float)]
    assert len(floats) > 20
    for key in floats:
        for bad in (".nan", ".inf", "-.inf"):
            with pytest.raises(C.ConfigError, match=f"--set: {key}=.* must be a finite number"):
                C.load_config("cpu_tiny", [f"{key}={bad}"])


def test_defaults_and_every_preset_are_valid():
    C.validate(C.Config())
    for name in C.preset_names():
        C.validate(C.load_config(name))


# -- rules between keys ------------------------------------------------------------------------------
CROSS = [
    (["inference.mode=refine"], "--set: inference.mode='refine' needs an IoU head, but "
     "model.iou_head.enabled=False (the default); train with model.iou_head.enabled=true, or use "
     "inference.mode=baseline"),
    (["inference.mode=iou_nms"], "--set: inference.mode='iou_nms' needs an IoU head"),
    (["inference.mode=iou_regular_nms"], "--set: inference.mode='iou_regular_nms' needs an IoU head"),
    (["model.rpn.fg_iou_thresh=0.2"], "--set: model.rpn.fg_iou_thresh=0.2 (from --set) must be >= "
     "model.rpn.bg_iou_thresh=0.3 (the default)"),
    (["model.roi_heads.bg_iou_thresh=0.6"], "--set: model.roi_heads.fg_iou_thresh=0.5 (the default) must be "
     ">= model.roi_heads.bg_iou_thresh=0.6 (from --set)"),
    (["model.max_size=64"], "--set: model.max_size=64 (from --set) must be >= model.min_size=128 "
     "(from preset cpu_tiny)"),
    (["train.eval_period=300"], "--set: train.eval_period=300 must be a multiple of "
     "train.checkpoint_period=500 (from preset cpu_tiny) (validation runs when a checkpoint is saved)"),
    (["data.val_ann=/x/val.json"], "--set: data.val_ann given without data.train_ann, data.train_images, "
     "data.val_images: set all four (or data.root)"),
]


@pytest.mark.parametrize("overrides, message", CROSS, ids=[" ".join(o) for o, _ in CROSS])
def test_cross_key_rules(overrides, message):
    with pytest.raises(C.ConfigError) as err:
        C.load_config("cpu_tiny", overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cross_key_rules_pass_when_consistent():
    cfg = C.load_config("cpu_tiny_iounet", ["inference.mode=refine", "train.eval_period=1000",
                                            "model.rpn.fg_iou_thresh=0.3"])
    assert cfg.inference.mode == "refine" and cfg.train.eval_period == 1000


def test_errors_name_the_file_a_value_came_from(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("base: cpu_tiny\ntrain:\n  lr: 0\n")
    with pytest.raises(C.ConfigError, match=rf"^{f}: train.lr=0.0 must be > 0$"):
        C.load_config(str(f))
    g = tmp_path / "mode.yaml"
    g.write_text("base: cpu_tiny\ninference:\n  mode: refine\n")
    with pytest.raises(C.ConfigError, match=rf"^{g}: inference.mode='refine' needs an IoU head"):
        C.load_config(str(g))
    # the key set last is blamed, and the other key's source is named
    h = tmp_path / "ious.yaml"
    h.write_text("base: cpu_tiny\nmodel:\n  rpn: {bg_iou_thresh: 0.6}\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_config(str(h), ["model.rpn.fg_iou_thresh=0.5"])
    assert str(err.value) == (f"--set: model.rpn.fg_iou_thresh=0.5 (from --set) must be >= "
                              f"model.rpn.bg_iou_thresh=0.6 (from {h})")


def test_a_stored_config_names_the_checkpoint():
    stored = C.to_dict(C.load_config("cpu_tiny"))
    stored["train"]["lr"] = -1.0
    with pytest.raises(C.ConfigError, match=r"^ckpt.pth \(stored config\): train.lr=-1.0 must be > 0$"):
        C.from_dict(stored, source="ckpt.pth (stored config)")
    stored = C.to_dict(C.load_config("cpu_tiny"))
    cfg = C.from_dict(stored, source="ckpt.pth (stored config)")
    C.apply_overrides(cfg, ["inference.mode=refine"])
    with pytest.raises(C.ConfigError, match=r"model.iou_head.enabled=False \(from ckpt.pth \(stored config\)\)"):
        C.validate(cfg)


def test_validate_checks_values_assigned_directly():
    cfg = C.load_config("cpu_tiny")
    cfg.train.checkpoint_period = 0
    with pytest.raises(C.ConfigError, match="^preset cpu_tiny: train.checkpoint_period=0 must be >= 1$"):
        C.validate(cfg)
    cfg = C.load_config("cpu_tiny")
    cfg.inference.score_thresh = float("nan")
    with pytest.raises(C.ConfigError, match="^my code: inference.score_thresh=nan must be a finite number$"):
        C.validate(cfg, "my code")


def test_sources_survive_clone_and_are_not_part_of_the_value():
    cfg = C.load_config("cpu_tiny", ["train.lr=0.01"])
    copy = C.clone(cfg)
    assert C.source_of(copy, "train.lr") == "--set" and C.source_of(copy, "model.roi_pool") == "preset cpu_tiny"
    assert C.source_of(copy, "train.momentum") == "default"
    assert C.from_dict(C.to_dict(cfg)) == cfg and "sources" not in C.to_dict(cfg)


BOX_LOSS = "model.roi_heads.box_loss"


def _box_loss(flat):
    return {k.rsplit(".", 1)[1]: v for k, v in flat.items() if k.startswith(BOX_LOSS + ".")}


@pytest.mark.parametrize("loss_type", ["iou", "giou", "diou", "ciou"])
def test_an_iou_loss_type_alone_gets_the_diou_codes_weight_and_frame(loss_type):
    cfg = C.load_config("cpu_tiny", [f"{BOX_LOSS}.type={loss_type}"])
    flat = _box_loss(C.flatten(cfg))  # what MLflow params and config.yaml show
    assert (flat["weight"], flat["frame"]) == (12.0, "proposal")
    assert "frame: proposal" in C.dump_yaml(cfg) and "weight: 12.0" in C.dump_yaml(cfg)
    assert "default for" in C.source_of(cfg, f"{BOX_LOSS}.weight")
    # Back to a delta loss: weight and frame follow again.
    C.apply_overrides(cfg, {f"{BOX_LOSS}.type": "l1"})
    assert (cfg.model.roi_heads.box_loss.weight, cfg.model.roi_heads.box_loss.frame) == (1.0, "image")


def test_smooth_l1_keeps_weight_1_and_the_image_frame():
    b = C.load_config("cpu_tiny").model.roi_heads.box_loss
    assert (b.type, b.weight, b.frame, b.smooth_l1_beta, b.ciou_v_grad) == \
        ("smooth_l1", 1.0, "image", pytest.approx(1 / 9), "exact")


@pytest.mark.parametrize("order", [["weight", "frame", "type"], ["type", "weight", "frame"]])
def test_explicit_weight_and_frame_win_over_the_types_default(order):
    values = {"type": "ciou", "weight": 1.0, "frame": "image"}
    cfg = C.load_config("cpu_tiny", [f"{BOX_LOSS}.{k}={values[k]}" for k in order])
    assert _box_loss(C.flatten(cfg))["weight"] == 1.0 and cfg.model.roi_heads.box_loss.frame == "image"
    # In a nested YAML mapping as well, whatever the key order.
    cfg = C.Config()
    C.set_value(cfg, BOX_LOSS, {k: values[k] for k in order})
    assert (cfg.model.roi_heads.box_loss.weight, cfg.model.roi_heads.box_loss.frame) == (1.0, "image")
    # A value other than the old type's default was chosen: a later type change keeps it.
    cfg = C.load_config("cpu_tiny", [f"{BOX_LOSS}.weight=2"])
    C.apply_overrides(cfg, {f"{BOX_LOSS}.type": "giou"})
    assert cfg.model.roi_heads.box_loss.weight == 2.0 and cfg.model.roi_heads.box_loss.frame == "proposal"


def test_a_type_set_on_a_stored_plan_gets_its_defaults():
    """Sweeps store the base config (to_dict) and apply each grid point's type afterwards."""
    plan = C.to_dict(C.load_config("r50_fpn_1x"))
    cfg = C.apply_overrides(C.from_dict(plan), {f"{BOX_LOSS}.type": "diou"})
    assert (cfg.model.roi_heads.box_loss.weight, cfg.model.roi_heads.box_loss.frame) == (12.0, "proposal")


@pytest.mark.parametrize("stored", [
    {"type": "ciou", "weight": 1.0, "frame": "image", "smooth_l1_beta": 1 / 9},
    {"type": "giou", "weight": 12.0, "frame": "image", "smooth_l1_beta": 1 / 9},
    {"type": "diou", "weight": 3.0, "frame": "proposal", "smooth_l1_beta": 1 / 9},
    {"type": "smooth_l1", "weight": 1.0, "frame": "image", "smooth_l1_beta": 1 / 9},
])
def test_configs_stored_before_box_loss_defaults_keep_their_meaning(stored):
    """Stored before per-type defaults and ciou_v_grad: the stored weight and frame still apply,
    and CIoU keeps its exact gradient."""
    data = C.to_dict(C.Config())
    box = data["model"]["roi_heads"]["box_loss"]
    box.clear()
    box.update(stored)
    loaded = C.from_dict(data).model.roi_heads.box_loss
    assert (loaded.type, loaded.weight, loaded.frame) == (stored["type"], stored["weight"], stored["frame"])
    assert loaded.ciou_v_grad == "exact"
    assert C.to_dict(C.from_dict(C.to_dict(C.from_dict(data))))["model"]["roi_heads"]["box_loss"] == \
        {**stored, "ciou_v_grad": "exact"}


def test_box_loss_choices():
    for key, bad in ((f"{BOX_LOSS}.type", "l2"), (f"{BOX_LOSS}.ciou_v_grad", "approx")):
        with pytest.raises(C.ConfigError, match="not one of"):
            C.load_config("cpu_tiny", [f"{key}={bad}"])
    assert C.load_config("cpu_tiny", [f"{BOX_LOSS}.type=l1"]).model.roi_heads.box_loss.type == "l1"


def test_every_named_string_key_lists_its_choices():
    """A string key with a named default (not a path, whose default is '') is an enum: CHOICES."""
    named = [k for k, v in C.flatten(C.Config()).items() if isinstance(v, str) and v]
    missing = [k for k in named if k not in C.CHOICES and k not in C.PATTERNS]
    assert not missing, f"string keys without CHOICES: {missing}"
    for key, choices in C.CHOICES.items():
        assert C.flatten(C.Config())[key] in choices, key


# The IoUNet reproduction's settings (issue 15): named options whose defaults are ioulab's behaviour.
PAPER_OPTIONS = [
    ("model.iou_head.roi_generator.balance", "uniform", ("uniform", "reference")),
    ("model.iou_head.init", "ioulab", ("ioulab", "reference", "reference_as_written")),
    ("inference.iou_nms.boxes", "per_class", ("per_class", "argmax")),
]


@pytest.mark.parametrize("key, default, choices", PAPER_OPTIONS, ids=[k for k, _, _ in PAPER_OPTIONS])
def test_iounet_reproduction_options(key, default, choices):
    assert C.CHOICES[key] == choices
    assert C.flatten(C.load_config("cpu_tiny_iounet"))[key] == default
    for value in choices:
        assert C.flatten(C.load_config("cpu_tiny_iounet", [f"{key}={value}"]))[key] == value
    with pytest.raises(C.ConfigError, match=f"--set: {key}='nope' is not one of {', '.join(choices)}"):
        C.load_config("cpu_tiny_iounet", [f"{key}=nope"])
    # configs stored before the key existed keep today's behaviour
    stored = C.to_dict(C.load_config("cpu_tiny_iounet"))
    *path, leaf = key.split(".")
    node = stored
    for part in path:
        node = node[part]
    del node[leaf]
    assert C.flatten(C.from_dict(stored))[key] == default


def test_papers_training_data_and_weight_decay_rule():
    """r50_fpn_1x (and the dataclass defaults): the papers' code drops training images without boxes
    and decays every parameter (the IoUNet reproduction on MMDetection); cpu_tiny keeps ioulab's
    earlier no-decay-on-1-D rule."""
    for cfg in (C.Config(), C.load_config("r50_fpn_1x")):
        assert cfg.data.filter_empty_train is True
        assert (cfg.train.weight_decay, cfg.train.weight_decay_1d, cfg.train.bias_lr_factor) == (1e-4, "all", 1.0)
    tiny = C.load_config("cpu_tiny")
    assert (tiny.data.filter_empty_train, tiny.train.weight_decay_1d) == (True, "none")
    diou = C.load_config("r50_fpn_1x", ["train.weight_decay_1d=none", "train.bias_lr_factor=2"])
    assert (diou.train.weight_decay_1d, diou.train.bias_lr_factor) == ("none", 2.0)
    with pytest.raises(C.ConfigError, match="^--set: train.weight_decay_1d='norm' is not one of all, bias, none$"):
        C.load_config("cpu_tiny", ["train.weight_decay_1d=norm"])
    with pytest.raises(C.ConfigError, match="^--set: train.bias_lr_factor=0.0 must be > 0$"):
        C.load_config("cpu_tiny", ["train.bias_lr_factor=0"])


@pytest.mark.parametrize("preset", ["cpu_tiny", "r50_fpn_1x"])
def test_configs_stored_before_filter_empty_and_weight_decay_1d_keep_their_meaning(preset):
    """Checkpoints and sweep plans written when every training image was kept and no 1-D parameter
    was decayed load with that behaviour, whatever the new defaults."""
    old = C.to_dict(C.load_config(preset))
    del old["data"]["filter_empty_train"], old["train"]["weight_decay_1d"]
    cfg = C.from_dict(old)
    assert (cfg.data.filter_empty_train, cfg.train.weight_decay_1d) == (False, "none")
    assert cfg.train.bias_lr_factor == 1.0  # its default is the old behaviour
    # stored with the keys: kept as stored
    for stored in (C.load_config(preset), C.load_config(preset, ["data.filter_empty_train=false",
                                                                  "train.weight_decay_1d=bias"])):
        assert C.from_dict(C.to_dict(stored)) == stored
