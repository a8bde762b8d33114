"""The CLI turns a user's mistake into one line on stderr and exit code 2 (like argparse), never a traceback;
a programming error still raises."""
import pytest

from ioulab.platform import cli
from ioulab.platform.cli import main


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    assert main(["eval", "--checkpoint", str(missing), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ioulab: error: checkpoint {missing} does not exist"


def test_unknown_config_key_is_one_line(capsys):
    assert main(["train", "--set", "model.roi_pol=prroi_pool", "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ioulab: error: --set: unknown config key 'model.roi_pol'")
    assert "model.roi_pool" in err and "Traceback" not in err


def test_other_exceptions_still_raise(monkeypatch):
    def broken(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "_run", broken)
    with pytest.raises(KeyError):
        main(["train", "--no-mlflow"])
