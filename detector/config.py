"""Typed configuration: dataclasses, YAML files, presets and dotted overrides.

One override mechanism serves the CLI (``--set model.roi_heads.box_loss.type=giou``) and Ray Tune's
``param_space`` (``{"model.roi_heads.box_loss.type": tune.grid_search([...])}``): both end in
:func:`apply_overrides`. Values are validated once, here, at the edge; errors name the key and the
file (or ``--set``) they came from, and an unknown key lists the nearest valid keys.

The dataclass defaults are the papers' setting (``r50_fpn_1x``: ResNet-50-FPN, 800/1333, SGD 0.02 for
16 images, 12 epochs, LR steps at epochs 8 and 11). Presets are YAML files of overrides in
``detector/presets/``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Mapping

import yaml

from ioulab.detector.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value or key is invalid; the message names the key and its source."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key (of each item, for a list key), and a list's length.
    Floats must also be finite (nan and inf are never allowed)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded
    hi_open: bool = False
    length: int | None = None  # list keys: exactly this many items

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "finite"

    def contains(self, x: float) -> bool:
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return self.hi is None or not (x > self.hi or (self.hi_open and x == self.hi))


POSITIVE = Range(0, lo_open=True)      # > 0
NON_NEGATIVE = Range(0)                # >= 0
AT_LEAST_1 = Range(1)                  # >= 1
UNIT = Range(0, 1)                     # a fraction or an IoU threshold: [0, 1]
FINITE = Range()

# Per dataclass: ``limits: ClassVar[Limits] = {"field": Range(...)}``, next to the fields it bounds.
Limits = dict[str, Range]


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    """The embedded default dataset, generated once into a cache folder."""

    limits: ClassVar[Limits] = {"num_train": AT_LEAST_1, "num_val": AT_LEAST_1, "size": Range(8),
                                "seed": NON_NEGATIVE}

    num_train: int = 512
    num_val: int = 128
    size: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    """Where the data is. Explicit annotation/image keys win over ``root``; with neither, the
    synthetic dataset (``synth``) is generated once into the cache and used."""

    limits: ClassVar[Limits] = {"flip_prob": UNIT, "num_workers": NON_NEGATIVE}

    root: str = ""  # a folder with annotations/{train,val}.json and {train,val}/ (ioulab data synth)
    train_ann: str = ""  # e.g. /data/coco/annotations/instances_train2017.json
    train_images: str = ""  # e.g. /data/coco/train2017
    val_ann: str = ""
    val_images: str = ""
    synth: SynthConfig = field(default_factory=SynthConfig)
    flip_prob: float = 0.5
    num_workers: int = 2
    # Drop training images whose target has no box (no annotation, or only crowd / degenerate
    # boxes), as detectron2 (DATALOADER.FILTER_EMPTY_ANNOTATIONS), Detectron (the DIoU code) and
    # mmdetection (filter_empty_gt; it keeps crowd-only images) do by default. Validation is never
    # filtered. Configs stored before this key: false.
    filter_empty_train: bool = True


@dataclass
class BackboneConfig:
    """The papers' backbone by default: ImageNet ResNet-50, FrozenBatchNorm, stem and layer1 frozen.

    ``pretrained``: start from ImageNet weights: the file ``weights`` (a torchvision ResNet state
    dict) if given, else torchvision's cache (downloaded once if the network allows). ``false``
    trains from scratch and then needs ``norm: bn`` and ``trainable_layers: 5`` (a frozen random
    layer learns nothing). ``norm``: frozen_bn | bn. ``tiny`` is always trained from scratch (its ``frozen_bn``: no
    normalization, no batch statistics)."""

    limits: ClassVar[Limits] = {"trainable_layers": Range(0, 5), "fpn_channels": AT_LEAST_1,
                                "tiny_widths": Range(1, length=4)}

    name: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | tiny
    pretrained: bool = True
    weights: str = ""  # a local torchvision ResNet state dict (GPU clusters often have no internet)
    norm: str = "frozen_bn"  # frozen_bn (FrozenBatchNorm2d) | bn (trainable BatchNorm2d)
    trainable_layers: int = 3  # of (stem, layer1..layer4), counted from layer4: 3 freezes stem+layer1
    fpn_channels: int = 256
    tiny_widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])  # tiny: per stage


@dataclass
class AnchorConfig:
    limits: ClassVar[Limits] = {"sizes": Range(0, lo_open=True, length=5),  # 5 FPN levels
                                "aspect_ratios": POSITIVE}

    sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per FPN level
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])


@dataclass
class RPNConfig:
    limits: ClassVar[Limits] = {
        "pre_nms_top_n_train": AT_LEAST_1, "pre_nms_top_n_test": AT_LEAST_1,
        "post_nms_top_n_train": AT_LEAST_1, "post_nms_top_n_test": AT_LEAST_1,
        "nms_thresh": UNIT, "fg_iou_thresh": UNIT, "bg_iou_thresh": UNIT,
        "batch_size_per_image": AT_LEAST_1, "positive_fraction": UNIT}

    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


@dataclass
class BoxLossConfig:
    """Box-head regression loss. ``type``: smooth_l1 | l1 (on the encoded deltas) | iou | giou |
    diou | ciou (on decoded boxes). ``frame``: image (decode against the proposals) | proposal
    (decode against a unit box, as the DIoU code does; changes DIoU's and CIoU's distance and
    aspect terms, not IoU or GIoU). ``weight`` and ``frame`` follow the type (``TYPE_DEFAULTS``:
    the DIoU code's 12.0 and proposal frame for the IoU family) unless set to something else.
    ``smooth_l1_beta``: 1/9 as torchvision, 1.0 in the DIoU code. ``ciou_v_grad``: exact (the
    CIoU formula differentiated) | reference (the DIoU code's no-grad surrogate for v)."""

    limits: ClassVar[Limits] = {"weight": NON_NEGATIVE, "smooth_l1_beta": NON_NEGATIVE}

    # Per type, the values weight and frame take when the type is set (see :func:`set_value`).
    TYPE_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        **{t: {"weight": 1.0, "frame": "image"} for t in ("smooth_l1", "l1")},
        **{t: {"weight": 12.0, "frame": "proposal"} for t in ("iou", "giou", "diou", "ciou")},
    }

    type: str = "smooth_l1"
    weight: float = 1.0
    frame: str = "image"
    smooth_l1_beta: float = 1.0 / 9.0  # torchvision's Fast R-CNN value
    ciou_v_grad: str = "exact"


@dataclass
class RoIHeadsConfig:
    limits: ClassVar[Limits] = {
        "batch_size_per_image": AT_LEAST_1, "positive_fraction": UNIT, "fg_iou_thresh": UNIT,
        "bg_iou_thresh": UNIT, "representation_size": AT_LEAST_1,
        "bbox_reg_weights": Range(0, lo_open=True, length=4)}

    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    representation_size: int = 1024
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    box_loss: BoxLossConfig = field(default_factory=BoxLossConfig)


@dataclass
class RoIGeneratorConfig:
    """IoU-balanced jittered RoIs that train the IoU head (not RPN proposals). ``strategy``:
    per_iou (``per_iou`` jitters per IoU bin per GT, at most ``max_per_img``) | per_img
    (``per_img`` RoIs per image spread evenly over bins and GTs). ``balance``: uniform (ioulab's
    table: ``table_cap`` jitters in every IoU bin, equal RoIs per bin) | reference (the IoUNet
    reproduction's grid and sampling: its top bin gets about 9% of the RoIs)."""

    limits: ClassVar[Limits] = {"per_iou": AT_LEAST_1, "per_img": AT_LEAST_1, "max_per_img": AT_LEAST_1,
                                "table_cap": AT_LEAST_1, "seed": NON_NEGATIVE}

    strategy: str = "per_img"
    balance: str = "uniform"
    per_iou: int = 30
    per_img: int = 1000
    max_per_img: int = 1000
    table_cap: int = 4000  # jitters kept per IoU bin of the (computed once) table
    seed: int = 0  # of the table; sampling from it uses the training RNG


@dataclass
class IoUHeadConfig:
    """IoUNet's class-aware IoU head on PrRoIPool features. ``loss``: smooth_l1 | bce.
    ``init`` of its three FC layers: ioulab (PyTorch's default FCs, output N(0, 0.001)) | reference
    (what the IoUNet reproduction's code runs: Xavier-normal on all three, biases 0) |
    reference_as_written (what its config states: Xavier FCs, output N(0, 0.01))."""

    limits: ClassVar[Limits] = {"loss_weight": NON_NEGATIVE, "representation_size": AT_LEAST_1}

    enabled: bool = False
    loss: str = "smooth_l1"
    loss_weight: float = 5.0
    representation_size: int = 1024
    init: str = "ioulab"
    roi_generator: RoIGeneratorConfig = field(default_factory=RoIGeneratorConfig)


@dataclass
class ModelConfig:
    limits: ClassVar[Limits] = {"pool_size": AT_LEAST_1, "min_size": AT_LEAST_1, "max_size": AT_LEAST_1,
                                "num_classes": NON_NEGATIVE}

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    iou_head: IoUHeadConfig = field(default_factory=IoUHeadConfig)
    roi_pool: str = "roi_align"  # roi_align | prroi_pool
    pool_size: int = 7
    min_size: int = 800
    max_size: int = 1333
    num_classes: int = 0  # 0: taken from the training set


@dataclass
class TrainConfig:
    limits: ClassVar[Limits] = {
        "batch_size": AT_LEAST_1, "lr": POSITIVE, "momentum": Range(0, 1, hi_open=True),
        "weight_decay": NON_NEGATIVE, "epochs": POSITIVE, "max_iters": NON_NEGATIVE,
        "lr_steps": UNIT, "gamma": POSITIVE, "warmup_iters": NON_NEGATIVE,
        "warmup_factor": Range(0, 1, lo_open=True), "grad_clip": NON_NEGATIVE,
        "checkpoint_period": AT_LEAST_1, "eval_period": NON_NEGATIVE, "keep_checkpoints": NON_NEGATIVE,
        "log_period": AT_LEAST_1, "seed": NON_NEGATIVE, "bias_lr_factor": POSITIVE}

    batch_size: int = 16
    lr: float = 0.02  # for batch_size (linear scaling rule: change both together)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # Which 1-D parameters weight_decay also applies to (see engine/train.py param_groups):
    # all (every parameter: mmdetection's default, the IoUNet reproduction) | bias (biases yes,
    # normalization layers no: detectron2's default) | none (neither: the DIoU code's Detectron
    # rule for biases). Configs stored before this key: none.
    weight_decay_1d: str = "all"
    bias_lr_factor: float = 1.0  # LR multiplier of every `bias` parameter (the DIoU code: 2.0)
    epochs: float = 12.0
    max_iters: int = 0  # > 0 overrides epochs
    lr_steps: list[float] = field(default_factory=lambda: [8 / 12, 11 / 12])  # fractions of the run
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    grad_clip: float = 0.0  # max grad norm; 0 disables
    checkpoint_period: int = 2000  # iterations; the last iteration is always saved
    eval_period: int = 0  # iterations between validation runs; 0: only at the end
    keep_checkpoints: int = 2
    log_period: int = 20
    # Mixed precision (torch.autocast). None (default): on for CUDA, off on CPU; true: on for any
    # device (bfloat16 on CPU runs the code path a GPU runs); false: off.
    amp: bool | None = None
    amp_dtype: str = "bfloat16"  # bfloat16 | float16 (float16 also scales the loss: GradScaler)
    seed: int = 0
    # Where the RPN / RoI samplers draw from: stream (the process's torch RNG, image after image;
    # configs stored before this key) | per_image (a generator per image, seeded by (seed,
    # iteration, position in the global batch): the same draws at any number of workers, see
    # model/sampling.py and engine/distributed.py).
    sampling: str = "stream"
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class NMSConfig:
    """Detection-head NMS (never the RPN's). ``type``: greedy | diou."""

    limits: ClassVar[Limits] = {"iou_threshold": UNIT, "beta": POSITIVE}

    type: str = "greedy"
    iou_threshold: float = 0.5
    beta: float = 1.0  # DIoU-NMS distance exponent; 0.9 recommended for Faster R-CNN


@dataclass
class IoUNMSConfig:
    """IoU-guided NMS: rank by predicted IoU (``iou``) or IoU × class score (``iou_x_score``).
    ``boxes``: per_class (each class's candidate is its own regressed box) | argmax (the IoUNet
    reproduction: each proposal is regressed once, with its best class's deltas, and that box is
    every class's candidate)."""

    limits: ClassVar[Limits] = {"iou_threshold": UNIT}

    rank: str = "iou"
    iou_threshold: float = 0.5
    boxes: str = "per_class"


@dataclass
class RefineConfig:
    """Optimization-based refinement: gradient ascent on the predicted IoU w.r.t. the box."""

    limits: ClassVar[Limits] = {"lam": NON_NEGATIVE, "steps": NON_NEGATIVE, "omega1": NON_NEGATIVE,
                                "omega2": FINITE}

    lam: float = 0.5  # step λ, scaled by box width/height
    steps: int = 5  # T
    omega1: float = 0.001  # stop when |ΔIoU| < omega1
    omega2: float = -0.01  # stop when ΔIoU < omega2
    # direct: the IoU head's input gradient and PrRoIPool's box gradient computed without autograd
    # (same results); autograd: torch.autograd.grad, the reference (configs stored before the key)
    impl: str = "direct"


@dataclass
class InferenceConfig:
    """Test-time knobs: they change no weights, so a grid over them reuses one checkpoint.

    ``mode``: baseline (box head + ``nms``; IoU head unused) | iou_nms (IoU-guided NMS) |
    iou_regular_nms (IoU predicted, then ``nms``: the speed control row) | refine (IoU-guided NMS,
    then refinement; final score = class score × IoU)."""

    limits: ClassVar[Limits] = {"score_thresh": UNIT, "detections_per_img": AT_LEAST_1, "batch_size": AT_LEAST_1}

    score_thresh: float = 0.05
    detections_per_img: int = 100
    batch_size: int = 8
    nms: NMSConfig = field(default_factory=NMSConfig)
    mode: str = "baseline"
    iou_nms: IoUNMSConfig = field(default_factory=IoUNMSConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        # Where each key's value came from (a preset, a file, --set, a space file, a checkpoint),
        # newest assignment last, so that :func:`validate` can name it. Not a field: it is not
        # part of the config's value (to_dict, flatten, ==).
        self.sources: dict[str, str] = {}


# Allowed values of the string choices, checked at the edge (the factory maps them to callables).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.backbone.name": ("resnet18", "resnet34", "resnet50", "resnet101", "tiny"),
    "model.backbone.norm": ("frozen_bn", "bn"),
    "model.roi_pool": ("roi_align", "prroi_pool"),
    "model.roi_heads.box_loss.type": ("smooth_l1", "iou", "giou", "diou", "ciou", "l1"),
    "model.roi_heads.box_loss.frame": ("image", "proposal"),
    "model.roi_heads.box_loss.ciou_v_grad": ("exact", "reference"),
    "inference.nms.type": ("greedy", "diou"),
    "model.iou_head.loss": ("smooth_l1", "bce"),
    "model.iou_head.roi_generator.strategy": ("per_iou", "per_img"),
    "model.iou_head.roi_generator.balance": ("uniform", "reference"),
    "model.iou_head.init": ("ioulab", "reference", "reference_as_written"),
    "inference.mode": ("baseline", "iou_nms", "iou_regular_nms", "refine"),
    "inference.iou_nms.rank": ("iou", "iou_x_score"),
    "inference.iou_nms.boxes": ("per_class", "argmax"),
    "inference.refine.impl": ("direct", "autograd"),
    "train.amp_dtype": ("bfloat16", "float16"),
    "train.weight_decay_1d": ("all", "bias", "none"),
    "train.sampling": ("stream", "per_image"),
}

# String keys with an open set of values: (regular expression, what to write).
PATTERNS: dict[str, tuple[str, str]] = {
    "train.device": (r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"),
}

DEFAULT_PRESET = "cpu_tiny"


# --------------------------------------------------------------------------------------------
# Flattening and typed assignment
# --------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"model.rpn.nms_thresh": 0.7, ...}`` for every leaf of the config."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                out[key] = value

    walk(cfg, "")
    return out


def valid_keys() -> list[str]:
    return sorted(flatten(Config()))


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to ``tp`` (int→float, tuple→list) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is types.UnionType:  # ``X | None``: null (``--set key=null`` gives "") or an X
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None or value == "" else _check_type(value, inner, key, source)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_check_type(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key} has an unsupported type {tp!r}")  # pragma: no cover


def _unknown_key(key: str, source: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    if not near:  # a typo in the last segment: suggest siblings
        head = key.rsplit(".", 1)[0]
        near = [k for k in valid_keys() if k.startswith(head + ".")][:5]
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def set_value(cfg: Config, key: str, value: Any, source: str = "--set") -> None:
    """Assign ``value`` to the dotted ``key`` of ``cfg`` after checking key, type and choices.

    Setting a section's ``type`` whose dataclass has ``TYPE_DEFAULTS`` (the box loss) also sets the
    keys that still hold the old type's default to the new type's; a value set on purpose (any
    other value, or one given in the same batch: ``type`` is applied first) stays."""
    obj: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown_key(key, source)
        obj = getattr(obj, part)
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    name = parts[-1]
    if name not in fields:
        raise _unknown_key(key, source)
    hints = typing.get_type_hints(type(obj))
    tp = hints[name]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} is a section; set its keys, e.g. {key}.<name>=...")
        for sub, sub_value in _types_first(value.items()):
            set_value(cfg, f"{key}.{sub}", sub_value, source)
        return
    value = _check_type(value, tp, key, source)
    problem = _value_problem(key, value, type(obj).limits.get(name))
    if problem:
        raise ConfigError(f"{source}: {problem}")
    old = getattr(obj, name)
    _assign(cfg, obj, key, value, source)
    table = getattr(type(obj), "TYPE_DEFAULTS", None)
    if name == "type" and table and old != value:
        # Keys that still hold the old type's default follow the type; others were chosen.
        for sub, default in table[value].items():
            if getattr(obj, sub) == table.get(old, {}).get(sub):
                _assign(cfg, obj, f"{key[:-len(name)]}{sub}", default, f"{source} (default for {key}={value})")


def _assign(cfg: Config, obj: Any, key: str, value: Any, source: str) -> None:
    setattr(obj, key.rsplit(".", 1)[-1], value)
    sources = _sources(cfg)
    sources.pop(key, None)
    sources[key] = source


def _types_first(items: Any) -> list[tuple[str, Any]]:
    """``(key, value)`` items with ``*.type`` keys first (stable otherwise), so that a key that
    follows its type (``TYPE_DEFAULTS``) and is given in the same batch keeps the given value."""
    return sorted(items, key=lambda item: str(item[0]).rsplit(".", 1)[-1] != "type")


def _sources(cfg: Config) -> dict[str, str]:
    if not hasattr(cfg, "sources"):  # a Config built without __post_init__ (e.g. copy.copy)
        cfg.sources = {}
    return cfg.sources


def source_of(cfg: Config, key: str) -> str:
    """Where the value of ``key`` came from: the last source that set it, else "default"."""
    return _sources(cfg).get(key, "default")


def _value_problem(key: str, value: Any, limit: Range | None) -> str | None:
    """What is wrong with one key's value on its own (range, finiteness, choices), or None."""
    if key in CHOICES and value not in CHOICES[key]:
        return f"{key}={value!r} is not one of {', '.join(CHOICES[key])}"
    if key in PATTERNS and not re.fullmatch(PATTERNS[key][0], str(value)):
        return f"{key}={value!r} must be {PATTERNS[key][1]}"
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and limit is not None and limit.length is not None \
            and len(value) != limit.length:
        return f"{key}={value!r} must have {limit.length} items"
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        name = f"{key}[{i}]" if isinstance(value, list) else key
        if not math.isfinite(item):
            return f"{name}={item!r} must be a finite number"
        if limit is not None and not limit.contains(item):
            return f"{name}={item!r} must be {limit}"
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=5"`` → ``("a.b", 5)``; the value is read as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if value is None:
        value = ""
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: Mapping[str, Any] | list[str], source: str = "--set") -> Config:
    """Apply ``{"dotted.key": value}`` or ``["dotted.key=value", ...]``; returns ``cfg``."""
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else overrides.items()
    for key, value in _types_first(items):
        set_value(cfg, key, value, source)
    return cfg


def _apply_nested(cfg: Config, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
    for key, value in _types_first(data.items()):
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _apply_nested(cfg, value, source, dotted + ".")
        else:
            set_value(cfg, dotted, value, source)


# --------------------------------------------------------------------------------------------
# Files and presets
# --------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    files = resources.files("ioulab.detector.presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config sections at the top level")
    return data


def load_config(spec: str | None = None, overrides: Mapping[str, Any] | list[str] = ()) -> Config:
    """Build a config from a preset name or a YAML file, then apply overrides.

    ``spec``: None (the default preset ``cpu_tiny``), a preset name (``r50_fpn_1x``), or a path to a
    YAML file. A file may name a preset to start from with a top-level ``base: <preset>`` (one level,
    no chains); otherwise it applies to the dataclass defaults (the papers' ``r50_fpn_1x``).
    """
    cfg = Config()
    spec = DEFAULT_PRESET if spec is None else spec
    if spec in preset_names():
        source = f"preset {spec}"
        text = resources.files("ioulab.detector.presets").joinpath(f"{spec}.yaml").read_text()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"config {spec!r} is neither a file nor a preset (presets: {', '.join(preset_names())})"
            )
        source, text = str(path), path.read_text()
    data = _read_yaml(text, source)
    base = data.pop("base", None)
    if base is not None:
        if base not in preset_names():
            raise ConfigError(f"{source}: base {base!r} is not a preset ({', '.join(preset_names())})")
        base_text = resources.files("ioulab.detector.presets").joinpath(f"{base}.yaml").read_text()
        _apply_nested(cfg, _read_yaml(base_text, f"preset {base}"), f"preset {base}")
    _apply_nested(cfg, data, source)
    apply_overrides(cfg, overrides if isinstance(overrides, list) else dict(overrides))
    validate(cfg, source)
    return cfg


def _leaves(obj: Any, prefix: str = ""):
    """(dotted key, owning dataclass, field name) of every leaf of the config."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", obj, f.name


def _blame(cfg: Config, *keys: str) -> str:
    """The source of whichever of ``keys`` was set last (the likely edit that broke a rule)."""
    order = list(_sources(cfg))
    return source_of(cfg, max(keys, key=lambda k: order.index(k) if k in order else -1))


def _shown(cfg: Config, key: str) -> str:
    """``key=value (from SOURCE)``: a key of a rule, with where its value came from."""
    source = source_of(cfg, key)
    return f"{key}={flatten(cfg)[key]!r} ({'the default' if source == 'default' else 'from ' + source})"


def _at_least(low: str, high: str):
    """A rule: the value of ``high`` must be >= the value of ``low``."""
    def rule(cfg: Config) -> tuple[tuple[str, ...], str] | None:
        flat = flatten(cfg)
        if flat[high] < flat[low]:
            return (high, low), f"{_shown(cfg, high)} must be >= {_shown(cfg, low)}"
        return None
    return rule


def mode_needs_iou_head(mode: str) -> bool:
    """The one statement of the rule: every inference mode but ``baseline`` reads the IoU head's
    predictions (the config rule below and the model factory both ask here)."""
    return mode != "baseline"


def _mode_needs_iou_head(cfg: Config):
    if mode_needs_iou_head(cfg.inference.mode) and not cfg.model.iou_head.enabled:
        return (("inference.mode", "model.iou_head.enabled"),
                f"inference.mode={cfg.inference.mode!r} needs an IoU head, but "
                f"{_shown(cfg, 'model.iou_head.enabled')}; train with model.iou_head.enabled=true, "
                "or use inference.mode=baseline")
    return None


def _eval_on_checkpoints(cfg: Config):
    # The trainer evaluates during training only when it saves a checkpoint.
    t = cfg.train
    if t.eval_period > 0 and t.eval_period % t.checkpoint_period:
        return (("train.eval_period", "train.checkpoint_period"),
                f"train.eval_period={t.eval_period} must be a multiple of "
                f"{_shown(cfg, 'train.checkpoint_period')} (validation runs when a checkpoint is saved)")
    return None


DATA_FILES = ("data.train_ann", "data.train_images", "data.val_ann", "data.val_images")


def _data_files_together(cfg: Config):
    flat = flatten(cfg)
    given = [k for k in DATA_FILES if flat[k]]
    if given and len(given) < len(DATA_FILES):
        missing = [k for k in DATA_FILES if not flat[k]]
        return tuple(given), f"{', '.join(given)} given without {', '.join(missing)}: set all four (or data.root)"
    return None


def _backbone_problem(b: BackboneConfig) -> tuple[tuple[str, ...], str] | None:
    """Backbone keys that only make sense together (see :class:`BackboneConfig`)."""
    if not 0 <= b.trainable_layers <= 5:
        return ("model.backbone.trainable_layers",), \
            f"model.backbone.trainable_layers must be 0..5, got {b.trainable_layers}"
    if b.name == "tiny" and b.pretrained:
        return (("model.backbone.name", "model.backbone.pretrained"),
                "the tiny backbone has no ImageNet weights; set model.backbone.pretrained=false")
    if b.weights and not b.pretrained:
        return (("model.backbone.weights", "model.backbone.pretrained"),
                "model.backbone.weights is set but model.backbone.pretrained=false")
    # tiny + frozen_bn: FrozenBatchNorm at identity, i.e. no normalization (data-parallel equivalence)
    if not b.pretrained and (b.norm != "bn" and b.name != "tiny" or b.trainable_layers != 5):
        return (("model.backbone.pretrained", "model.backbone.norm", "model.backbone.trainable_layers"),
                "model.backbone.pretrained=false trains from scratch: also set "
                "model.backbone.norm=bn and model.backbone.trainable_layers=5 "
                "(frozen BatchNorm or layers would keep their random weights)")
    return None


def _backbone_rule(cfg: Config):
    return _backbone_problem(cfg.model.backbone)


def validate_backbone(b: BackboneConfig, source: str = "config") -> BackboneConfig:
    """:func:`validate`'s backbone rule for a backbone config on its own (e.g. in ``build_model``)."""
    problem = _backbone_problem(b)
    if problem is not None:
        raise ConfigError(f"{source}: {problem[1]}")
    return b


# Rules between keys: each returns None or (the keys involved, the message).
CROSS_RULES = (
    _mode_needs_iou_head,
    _at_least("model.rpn.bg_iou_thresh", "model.rpn.fg_iou_thresh"),
    _at_least("model.roi_heads.bg_iou_thresh", "model.roi_heads.fg_iou_thresh"),
    _at_least("model.min_size", "model.max_size"),
    _eval_on_checkpoints,
    _data_files_together,
    _backbone_rule,
)


def validate(cfg: Config, source: str | None = None) -> Config:
    """Check the whole config: every key's range, finiteness and choices, then the rules between
    keys. Raises :class:`ConfigError` naming the key and where its value came from (``source``
    names values assigned directly, without :func:`set_value`)."""
    known = _sources(cfg)
    for key, obj, name in _leaves(cfg):
        problem = _value_problem(key, getattr(obj, name), type(obj).limits.get(name))
        if problem:
            raise ConfigError(f"{known.get(key, source or 'default')}: {problem}")
    for rule in CROSS_RULES:
        broken = rule(cfg)
        if broken is not None:
            keys, message = broken
            raise ConfigError(f"{_blame(cfg, *keys)}: {message}")
    return cfg


def from_dict(data: Mapping[str, Any], source: str = "checkpoint") -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. stored in a checkpoint)."""
    train = data.get("train", {})
    if train.get("amp") is True and "amp_dtype" not in train:
        # Stored before train.amp_dtype existed, when train.amp=true meant "on CUDA only".
        data = {**data, "train": {**train, "amp": None}}
    # Stored before these keys existed: the behaviour of then (every training image kept, no weight
    # decay on 1-D parameters), not the new defaults.
    for section, key, then in (("data", "filter_empty_train", False), ("train", "weight_decay_1d", "none")):
        if section in data and key not in data[section]:
            data = {**data, section: {**data[section], key: then}}
    refine = data.get("inference", {}).get("refine")
    if refine is not None and "impl" not in refine:  # stored before inference.refine.impl: autograd
        data = {**data, "inference": {**data["inference"], "refine": {**refine, "impl": "autograd"}}}
    cfg = Config()
    _apply_nested(cfg, data, source)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff(a: Config, b: Config, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Keys (starting with ``prefix``) whose values differ: ``{key: (a_value, b_value)}``."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa[k], fb[k]) for k in fa if k.startswith(prefix) and fa[k] != fb[k]}


def clone(cfg: Config) -> Config:
    return copy.deepcopy(cfg)


__all__ = [
    "Config", "ModelConfig", "DataConfig", "TrainConfig", "InferenceConfig", "NMSConfig",
    "BackboneConfig", "AnchorConfig", "RPNConfig", "RoIHeadsConfig", "BoxLossConfig", "SynthConfig",
    "ConfigError", "CHOICES", "PATTERNS", "Range", "load_config", "source_of", "validate", "validate_backbone", "apply_overrides", "set_value", "parse_override",
    "flatten", "to_dict", "from_dict", "dump_yaml", "diff", "clone", "valid_keys", "preset_names",
]
