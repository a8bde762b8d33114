"""Data config → datasets: missing locations are one-line errors naming the key and the path."""
import shutil

import pytest

from ioulab.detector.config import DataConfig
from ioulab.detector.data.coco import DataError, MissingDataError
from ioulab.detector.engine.datasets import build_dataset, build_datasets, resolve_paths


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
