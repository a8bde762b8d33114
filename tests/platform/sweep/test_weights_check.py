"""`ioulab sweep` checks the ImageNet weights of every training point before Ray starts."""
import torch

from ioulab.detector.model import backbone
from ioulab.platform.cli import main
from tests.platform.sweep.conftest import SPACES


def test_r50_sweep_without_weights_fails_before_ray_and_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty torchvision cache
    monkeypatch.setattr(torch.hub, "_hub_dir", None)

    def no_network(url, dst):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(backbone, "_download", no_network)
    import ray

    def no_ray(*args, **kwargs):  # Ray may already be up from an earlier test: prove *this* command
        raise AssertionError("ray.init called before the weights check")  # never starts it

    monkeypatch.setattr(ray, "init", no_ray)
    storage, db = tmp_path / "ray_results", tmp_path / "mlflow.db"
    code = main(["sweep", str(SPACES / "box_loss.yaml"), "--profile", "r50", "--storage", str(storage),
                 "--tracking-uri", f"sqlite:///{db}", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "model.backbone.weights=" in err and "resnet50-0676ba61.pth" in err
    assert not storage.exists() and not db.exists()
