import json

from ioulab.platform.cli import main


def test_data_synth_writes_the_dataset_and_reports_counts(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--train", "4", "--val", "2"]) == 0
    train = json.loads((out / "annotations" / "train.json").read_text())
    val = json.loads((out / "annotations" / "val.json").read_text())
    assert len(train["images"]) == 4 and len(val["images"]) == 2
    assert all((out / "train" / img["file_name"]).is_file() for img in train["images"])
    assert all((out / "val" / img["file_name"]).is_file() for img in val["images"])
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert f"train: 4 images, {len(train['annotations'])} boxes" in printed
    assert f"val: 2 images, {len(val['annotations'])} boxes" in printed


def test_data_synth_options_reach_the_generator(tmp_path):
    out = tmp_path / "small"
    args = ["data", "synth", "--out", str(out), "--train", "1", "--val", "1", "--size", "64",
            "--seed", "3", "--no-progress"]
    assert main(args) == 0
    info = json.loads((out / "annotations" / "train.json").read_text())["images"][0]
    assert (info["width"], info["height"]) == (64, 64)
    marker = json.loads((out / ".ioulab_synth.json").read_text())
    assert marker["params"] == {"num_train": 1, "num_val": 1, "size": 64, "seed": 3}


def test_data_synth_refuses_a_foreign_folder_with_a_message(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["data", "synth", "--out", str(tmp_path), "--train", "1", "--val", "1"]) == 2
    assert "not an ioulab synthetic dataset" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
