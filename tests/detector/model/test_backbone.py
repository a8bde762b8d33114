"""The papers' backbone (r50_fpn_1x): ImageNet weights from a local file or torchvision's cache,
FrozenBatchNorm, stem and layer1 frozen; missing or bad weights fail in one line. Never downloads."""
import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from ioulab.detector import config as C
from ioulab.detector.engine.checkpoint_file import load as load_checkpoint
from ioulab.detector.engine.train import train
from ioulab.detector.model import backbone
from ioulab.detector.model import build_model
from ioulab.detector.model.build import pretrained_weights

SMALL_R50 = [  # r50_fpn_1x at 64 px with few proposals and RoIs: seconds per step on a CPU
    "model.min_size=64", "model.max_size=64",
    "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=32",
    "model.rpn.pre_nms_top_n_test=50", "model.rpn.post_nms_top_n_test=16",
    "model.roi_heads.batch_size_per_image=16", "model.roi_heads.representation_size=32",
    "train.batch_size=2", "train.max_iters=2", "train.warmup_iters=1", "train.lr=0.01",
    "train.checkpoint_period=2", "train.log_period=1", "train.device=cpu", "train.amp=false",
    "data.num_workers=0", "inference.batch_size=3",
]
FROZEN, TRAINABLE = ("conv1.", "bn1.", "layer1."), ("layer2.", "layer3.", "layer4.")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random ResNet-50 state dict in torchvision's format, as a user's local weights file."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """torchvision's cache in an empty folder, and every download attempt fails (no network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    attempts = []

    def no_network(url, dst):
        attempts.append(url)
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(backbone, "_download", no_network)
    return tmp_path / "torch_home", attempts


def _file_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.timeout(120)
def test_r50_preset_is_the_papers_backbone(weights_file):
    cfg = C.load_config("r50_fpn_1x", [f"model.backbone.weights={weights_file}"])
    assert (cfg.model.backbone.pretrained, cfg.model.backbone.norm, cfg.model.backbone.trainable_layers) == \
        (True, "frozen_bn", 3)
    body = build_model(cfg.model, 3, cfg.inference).backbone.body
    state = _file_state(weights_file)
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.2.conv3.weight", "layer3.1.bn2.running_var"):
        assert torch.equal(body.state_dict()[name], state[name]), name
    norms = [m for m in body.modules() if isinstance(m, (torch.nn.BatchNorm2d, FrozenBatchNorm2d))]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    for name, p in body.named_parameters():
        assert p.requires_grad == name.startswith(TRAINABLE), name


@pytest.mark.timeout(240)
def test_r50_preset_trains_two_iterations_with_stem_and_layer1_frozen(weights_file, synth_root, tmp_path):
    cfg = C.load_config("r50_fpn_1x", [f"data.root={synth_root}", f"model.backbone.weights={weights_file}",
                                       *SMALL_R50])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.iterations == 2 and all(v == v for v in result.metrics.values())
    trained = {k[len("backbone.body."):]: v for k, v in load_checkpoint(result.checkpoint)["model"].items()
               if k.startswith("backbone.body.")}
    state = _file_state(weights_file)
    frozen = [k for k in trained if k.startswith(FROZEN)]
    assert frozen and all(torch.equal(trained[k], state[k]) for k in frozen)
    assert not any(k.endswith("num_batches_tracked") for k in trained)  # FrozenBatchNorm2d: no batch statistics
    for stage in TRAINABLE:
        conv = f"{stage}0.conv1.weight"
        assert not torch.equal(trained[conv], state[conv]), f"{stage} did not train"
        assert torch.equal(trained[f"{stage}0.bn1.running_mean"], state[f"{stage}0.bn1.running_mean"])


def test_missing_weights_fail_in_one_line_naming_both_ways(empty_torch_home):
    home, attempts = empty_torch_home
    with pytest.raises(backbone.BackboneWeightsError) as info:
        pretrained_weights(C.load_config("r50_fpn_1x").model)
    message = str(info.value)
    assert "\n" not in message and len(attempts) == 1
    cached = home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert str(cached) in message and backbone.imagenet_url("resnet50") in message  # way 1: the cache
    assert "--set model.backbone.weights=" in message  # way 2: a local file
    assert "network unreachable (test)" in message


def test_weights_are_taken_from_torchvisions_cache_without_download(empty_torch_home, weights_file):
    home, attempts = empty_torch_home
    cached = home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(weights_file)
    assert pretrained_weights(C.load_config("r50_fpn_1x").model) == cached and attempts == []


def test_train_command_fails_before_data_and_mlflow(empty_torch_home, tmp_path, capsys):
    from ioulab.platform.cli import main

    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    code = main(["train", "--config", "r50_fpn_1x", "--out", str(out), "--tracking-uri", f"sqlite:///{db}",
                 "--set", f"data.root={tmp_path / 'no_data_here'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "model.backbone.weights=" in err
    assert not out.exists() and not db.exists() and not (tmp_path / "no_data_here").exists()


def test_from_scratch_needs_trainable_norm_and_layers(weights_file):
    with pytest.raises(C.ConfigError, match=r"model.backbone.norm=bn and model.backbone.trainable_layers=5"):
        C.load_config("r50_fpn_1x", ["model.backbone.pretrained=false"])
    with pytest.raises(C.ConfigError, match=r"model.backbone.weights is set but model.backbone.pretrained=false"):
        C.load_config("r50_fpn_1x", ["model.backbone.pretrained=false", "model.backbone.norm=bn",
                                     "model.backbone.trainable_layers=5", f"model.backbone.weights={weights_file}"])
    with pytest.raises(C.ConfigError, match=r"tiny backbone has no ImageNet weights"):
        C.load_config("cpu_tiny", ["model.backbone.pretrained=true"])
    cfg = C.load_config("r50_fpn_1x", ["model.backbone.pretrained=false", "model.backbone.norm=bn",
                                       "model.backbone.trainable_layers=5"])
    assert pretrained_weights(cfg.model) is None
    body = backbone.resnet_fpn("resnet50", None, "bn", 5, 256).body
    assert isinstance(body.bn1, torch.nn.BatchNorm2d) and all(p.requires_grad for p in body.parameters())


def test_a_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    cfg = C.load_config("r50_fpn_1x", [f"model.backbone.weights={missing}"])
    with pytest.raises(backbone.BackboneWeightsError, match=rf"^model.backbone.weights={missing}: no such file$"):
        pretrained_weights(cfg.model)


@pytest.mark.parametrize("content", ["garbage", "wrong_keys", "resnet18"])
def test_a_bad_weights_file_fails_in_one_line_naming_it(tmp_path, content):
    path = tmp_path / f"{content}.pth"
    if content == "garbage":
        path.write_bytes(b"this is not a torch file")
    elif content == "wrong_keys":
        torch.save({"model": {"conv1.weight": torch.zeros(1)}, "epoch": 3}, path)
    else:
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(backbone.BackboneWeightsError) as info:
        backbone.resnet_fpn("resnet50", path, "frozen_bn", 3, 256)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_a_model_for_a_checkpoint_needs_no_imagenet_weights(empty_torch_home):
    home, attempts = empty_torch_home  # evaluation replaces the weights: nothing is looked up
    cfg = C.load_config("r50_fpn_1x", ["model.min_size=64", "model.max_size=64"])
    body = build_model(cfg.model, 3, cfg.inference, load_pretrained=False).backbone.body
    assert attempts == [] and not home.exists() and isinstance(body.bn1, FrozenBatchNorm2d)
