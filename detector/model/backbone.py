"""Backbones with FPN: torchvision's ResNet-FPN, and a tiny conv net for CPU runs.

Shape glossary: N images, C channels, H×W input size. Every backbone returns
``OrderedDict[str, Tensor[N, fpn_channels, H/s, W/s]]`` with keys "0".."3" for strides 4, 8, 16, 32
and "pool" for stride 64 (torchvision's ``LastLevelMaxPool``), and has ``out_channels``.

ImageNet weights (the papers' initialisation) come from a local file or torchvision's cache
(``$TORCH_HOME/hub/checkpoints``, downloaded there once if the network allows):
:func:`resolve_imagenet_weights` finds them or fails with one line naming both ways to provide them,
so commands call it before any work; :func:`load_resnet_weights` checks a file fits the network.
"""
from __future__ import annotations

import os
import urllib.request
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from ioulab.detector.errors import UserError

NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}
PROBE_TIMEOUT = 10.0  # seconds: a cluster without internet must fail fast, not hang on a connect


class BackboneWeightsError(UserError, ValueError):
    """ImageNet weights are missing, or a weights file does not fit the backbone."""


def _conv_bn(cin: int, cout: int, stride: int, norm: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        norm(cout),
        nn.ReLU(inplace=True),
    )


class TinyBody(nn.Module):
    """Four stages of 3×3 conv-BN-ReLU at strides 4, 8, 16, 32 (``layer1``..``layer4``).

    Small enough for a 2-core CPU at 128 px; two convs per stage give the receptive field that
    objects of 12–60 px need.
    """

    def __init__(self, widths: list[int], norm: type[nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"tiny backbone needs 4 stage widths, got {widths}")
        w1, w2, w3, w4 = widths

        def cb(cin: int, cout: int, stride: int) -> nn.Sequential:
            return _conv_bn(cin, cout, stride, norm)

        self.stem = nn.Sequential(cb(3, w1 // 2, 2), cb(w1 // 2, w1, 2))
        self.layer1 = cb(w1, w1, 1)
        self.layer2 = nn.Sequential(cb(w1, w2, 2), cb(w2, w2, 1))
        self.layer3 = nn.Sequential(cb(w2, w3, 2), cb(w3, w3, 1))
        self.layer4 = nn.Sequential(cb(w3, w4, 2), cb(w4, w4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - used via IntermediateLayerGetter
        for m in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = m(x)
        return x


def tiny_fpn_backbone(widths: list[int], fpn_channels: int, norm: str = "bn") -> BackboneWithFPN:
    """``norm``: bn (trainable BatchNorm, cpu_tiny) | frozen_bn (FrozenBatchNorm2d at its identity
    initialization: no normalization and no batch statistics, so a step does not depend on how
    the batch is split over data-parallel workers; engine/distributed.py)."""
    body = TinyBody(widths, NORM_LAYERS[norm])
    return_layers = OrderedDict((f"layer{i + 1}", str(i)) for i in range(4))
    return BackboneWithFPN(body, return_layers, in_channels_list=list(widths), out_channels=fpn_channels)


def imagenet_url(name: str) -> str:
    """torchvision's ImageNet-1k (V1, the papers' torch-era weights) URL of ResNet ``name``."""
    return get_model_weights(name)["IMAGENET1K_V1"].url


def cached_weights_path(name: str) -> Path:
    """Where torchvision's ``weights=`` (``load_state_dict_from_url``) keeps the file of ``name``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_url(name))


def _download(url: str, dst: Path) -> None:
    """Fetch ``url`` to ``dst`` (atomically, hash-checked as torch.hub does); a short probe first so
    that a node without internet fails in seconds instead of waiting on a connect."""
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT).close()
    dst.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(dst.name)
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=match.group(1) if match else None)


def missing_weights_message(name: str, reason: str) -> str:
    path = cached_weights_path(name)
    return (f"no ImageNet weights for {name} (model.backbone.pretrained=true): {path} is not in "
            f"torchvision's cache and the download failed ({reason}). Either put {imagenet_url(name)} "
            f"at {path} (the cache follows $TORCH_HOME), or pass --set model.backbone.weights=/path/{path.name}")


def resolve_imagenet_weights(name: str, weights: str = "", download: bool = True) -> Path:
    """The file holding ImageNet weights for ResNet ``name``: ``weights`` if given, else torchvision's
    cached file, downloaded first if missing and ``download``. Raises :class:`BackboneWeightsError`
    (one line naming both ways to provide them) if there is none."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(f"model.backbone.weights={weights}: no such file")
        return path.resolve()
    path = cached_weights_path(name)
    if path.is_file():
        return path
    if not download:
        raise BackboneWeightsError(missing_weights_message(name, "not attempted"))
    try:
        _download(imagenet_url(name), path)
    except Exception as exc:  # noqa: BLE001 - any network/file failure means the same to the user
        raise BackboneWeightsError(missing_weights_message(name, f"{type(exc).__name__}: {exc}")) from None
    return path


def load_resnet_weights(body: nn.Module, path: Path, name: str) -> None:
    """Load a torchvision ResNet state dict (``torchvision.models.<name>().state_dict()``, as saved
    by ``torch.save``) into ``body`` (the ResNet without ``fc``). Errors name the file."""
    where = f"model.backbone.weights: {path}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors have many types
        raise BackboneWeightsError(f"{where}: not a torch-saved state dict ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{where}: expected a state dict of tensors "
                                   f"(torchvision.models.{name}().state_dict()), got {type(state).__name__}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier is not used
    counters = "num_batches_tracked"  # BatchNorm's counter: FrozenBatchNorm2d has none, old files neither
    expected = {k for k in body.state_dict() if not k.endswith(counters)}
    keys = {k for k in state if not k.endswith(counters)}
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        raise BackboneWeightsError(
            f"{where}: not a torchvision {name} state dict ({len(missing)} missing keys, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    try:
        body.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise BackboneWeightsError(f"{where}: does not fit {name}: {first}") from None


def resnet_fpn(name: str, weights: Path | None, norm: str, trainable_layers: int,
               fpn_channels: int) -> BackboneWithFPN:
    """torchvision's ResNet-FPN with ``norm`` (``frozen_bn``: FrozenBatchNorm2d, the papers' choice
    with ImageNet weights | ``bn``: trainable BatchNorm, for training from scratch) and the last
    ``trainable_layers`` of (stem, layer1..layer4) trainable (3: stem and layer1 frozen, as the
    papers and torchvision's detectors). ``weights``: a file from :func:`resolve_imagenet_weights`,
    or None for a random initialisation."""
    backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=NORM_LAYERS[norm],
                                   trainable_layers=trainable_layers)
    if weights is not None:
        load_resnet_weights(backbone.body, weights, name)
    if fpn_channels != backbone.out_channels:
        raise ValueError("ResNet-FPN in torchvision has 256 FPN channels; set model.backbone.fpn_channels=256")
    return backbone
