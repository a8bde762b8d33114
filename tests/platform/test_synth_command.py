import json

from ioulab.platform.cli import main


def test_data_synth_command(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(out), "--train", "4", "--val", "2", "--size", "64",
                 "--no-progress"]) == 0
    train = json.loads((out / "annotations" / "train.json").read_text())
    val = json.loads((out / "annotations" / "val.json").read_text())
    assert len(train["images"]) == 4 and len(val["images"]) == 2
    assert all((out / "train" / im["file_name"]).is_file() for im in train["images"])
    assert all((out / "val" / im["file_name"]).is_file() for im in val["images"])
    assert "train: 4 images" in capsys.readouterr().out
