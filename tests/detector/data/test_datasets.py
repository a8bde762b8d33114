"""Data config → datasets: missing locations are one-line errors naming the key and the path."""
import json
import shutil

import pytest

from ioulab.detector.config import DataConfig
from ioulab.detector.data.coco import DataError, MissingDataError
from ioulab.detector.data.datasets import build_dataset, build_datasets, resolve_paths


def test_missing_root_names_the_key(tmp_path):
    with pytest.raises(MissingDataError, match=rf"^data.root: {tmp_path / 'nope'} does not exist"):
        resolve_paths(DataConfig(root=str(tmp_path / "nope")))


def test_missing_explicit_files_name_the_key(synth_root, tmp_path):
    cfg = DataConfig(train_ann=str(synth_root / "annotations" / "train.json"), train_images=str(synth_root / "train"),
                     val_ann=str(tmp_path / "val.json"), val_images=str(synth_root / "val"))
    with pytest.raises(MissingDataError, match=rf"^data.val_ann: val annotation file {tmp_path / 'val.json'} does not exist$"):
        resolve_paths(cfg)
    with pytest.raises(DataError, match="must be given together"):
        resolve_paths(DataConfig(val_ann="x.json"))


def test_both_splits_are_checked_before_training(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    train, val = build_datasets(DataConfig(root=str(root)))
    assert len(train) == 12 and len(val) == 6
    assert build_dataset(DataConfig(root=str(root)), "val").ids == val.ids
    broken = sorted((root / "val").iterdir())[-1]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated validation image
    with pytest.raises(DataError, match=rf"^{root / 'val'}: 1 of 6 images of val.json are unusable: "
                                        rf"{broken.name} is truncated"):
        build_datasets(DataConfig(root=str(root)))


def _with_an_unannotated_image(synth_root, root):
    """A copy of the synthetic set whose splits each list one more image, without annotations."""
    shutil.copytree(synth_root, root)
    for split in ("train", "val"):
        ann = root / "annotations" / f"{split}.json"
        data = json.loads(ann.read_text())
        data["images"].append({**data["images"][0], "id": max(i["id"] for i in data["images"]) + 1})
        ann.write_text(json.dumps(data))
    return root


def test_filter_empty_train_drops_training_images_only_and_says_so(synth_root, tmp_path, capsys):
    root = _with_an_unannotated_image(synth_root, tmp_path / "data")
    train, val = build_datasets(DataConfig(root=str(root)))  # filter_empty_train defaults to true
    assert (len(train), train.num_empty_dropped, len(val)) == (12, 1, 7)  # validation never filtered
    assert capsys.readouterr().err == ("[ioulab] data.filter_empty_train: dropped 1 training image(s) "
                                       "without a usable box from train.json; 12 left\n")
    assert build_dataset(DataConfig(root=str(root)), "train").ids == train.ids
    assert len(build_dataset(DataConfig(root=str(root)), "val")) == 7
    capsys.readouterr()
    kept, _ = build_datasets(DataConfig(root=str(root), filter_empty_train=False))
    assert (len(kept), kept.num_empty_dropped) == (13, 0) and capsys.readouterr().err == ""
