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


# -- bad input never wastes a run: config and data are checked before any work and any MLflow run ----
import json  # noqa: E402
import shutil  # noqa: E402

from tests.conftest import TINY_OVERRIDES  # noqa: E402


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working folder whose default MLflow store would be ./mlflow.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def one_line_error(argv, capsys, workdir, out="run") -> str:
    """Run the CLI; assert exit 2, one line on stderr, no traceback, nothing written."""
    assert main(argv + ["--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ioulab: error: ") and "Traceback" not in err, err
    assert not (workdir / out).exists(), "a run folder was written"
    assert not (workdir / "mlflow.db").exists(), "an MLflow store (and run) was created"
    return err.strip().removeprefix("ioulab: error: ")


def tiny_args(root) -> list[str]:
    return [a for o in [f"data.root={root}", *TINY_OVERRIDES] for a in ("--set", o)]


@pytest.mark.parametrize("override, message", [
    ("train.lr=.nan", "--set: train.lr=nan must be a finite number"),
    ("train.lr=0", "--set: train.lr=0.0 must be > 0"),
    ("train.batch_size=0", "--set: train.batch_size=0 must be >= 1"),
    ("train.max_iters=-5", "--set: train.max_iters=-5 must be >= 0"),
    ("train.checkpoint_period=0", "--set: train.checkpoint_period=0 must be >= 1"),
    ("inference.score_thresh=2", "--set: inference.score_thresh=2.0 must be in [0, 1]"),
    ("model.rpn.fg_iou_thresh=0.1", "--set: model.rpn.fg_iou_thresh=0.1 (from --set) must be >= "
                                    "model.rpn.bg_iou_thresh=0.3 (the default)"),
    ("inference.mode=refine", "--set: inference.mode='refine' needs an IoU head"),
])
def test_train_rejects_bad_config_before_any_work(override, message, synth_root, workdir, capsys):
    err = one_line_error(["train", *tiny_args(synth_root), "--set", override], capsys, workdir)
    assert err.startswith(message)


def _broken_copy(synth_root, workdir, breaker):
    root = workdir / "data"
    shutil.copytree(synth_root, root)
    breaker(root)
    return root


def _truncate_last_val_image(root):
    image = sorted((root / "val").iterdir())[-1]
    image.write_bytes(image.read_bytes()[:300])


def _empty_val(root):
    ann = root / "annotations" / "val.json"
    ann.write_text(json.dumps({**json.loads(ann.read_text()), "images": [], "annotations": []}))


def _duplicate_train_id(root):
    ann = root / "annotations" / "train.json"
    data = json.loads(ann.read_text())
    data["images"][1]["id"] = data["images"][0]["id"]
    ann.write_text(json.dumps(data))


def _malformed_train_json(root):
    ann = root / "annotations" / "train.json"
    ann.write_text(ann.read_text()[:-10])


@pytest.mark.parametrize("breaker, needle", [
    (_truncate_last_val_image, "/data/val: 1 of 6 images of val.json are unusable: 000006.png is truncated"),
    (_empty_val, "/data/annotations/val.json: no images (an empty split cannot be trained or evaluated)"),
    (_duplicate_train_id, "/data/annotations/train.json: 1 image id(s) used more than once: 1"),
    (_malformed_train_json, "/data/annotations/train.json: not valid JSON: line 1 column"),
    (lambda root: shutil.rmtree(root), "data.root: "),
])
def test_train_rejects_bad_data_before_training_and_mlflow(breaker, needle, synth_root, workdir, capsys):
    root = _broken_copy(synth_root, workdir, breaker)
    err = one_line_error(["train", *tiny_args(root)], capsys, workdir)
    assert needle in err


@pytest.fixture
def plain_checkpoint(synth_root, tmp_path_factory):
    """A checkpoint of an untrained tiny model without an IoU head (no training needed)."""
    from ioulab.detector import config as C
    from ioulab.detector.engine import checkpoint_file as ckpt_io
    from ioulab.detector.model import build_model

    cfg = C.load_config("cpu_tiny", [f"data.root={synth_root}", *TINY_OVERRIDES])
    path = tmp_path_factory.mktemp("ckpt") / "model_0000004.pth"
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "iteration": 4, "config": C.to_dict(cfg),
                         "dataset": {"num_classes": 5, "label_to_cat_id": [-1, 1, 2, 3, 4, 5],
                                     "class_names": list("abcde")},
                         "model": build_model(cfg.model, 5, cfg.inference).state_dict()}, path)
    return path


@pytest.mark.parametrize("override, message", [
    ("inference.refine.steps=-1", "--set: inference.refine.steps=-1 must be >= 0"),
    ("inference.mode=refine", "--set: inference.mode='refine' needs an IoU head, but model.iou_head.enabled=False "
                              "(from {ckpt} (stored config))"),
    ("inference.score_thresh=.nan", "--set: inference.score_thresh=nan must be a finite number"),
])
def test_eval_checks_what_train_checks(override, message, plain_checkpoint, workdir, capsys):
    err = one_line_error(["eval", "--checkpoint", str(plain_checkpoint), "--set", override], capsys, workdir)
    assert err.startswith(message.format(ckpt=plain_checkpoint))


def test_eval_rejects_bad_data_before_mlflow(plain_checkpoint, synth_root, workdir, capsys):
    root = _broken_copy(synth_root, workdir, _truncate_last_val_image)
    err = one_line_error(["eval", "--checkpoint", str(plain_checkpoint), "--set", f"data.root={root}"],
                         capsys, workdir)
    assert "/data/val: 1 of 6 images of val.json are unusable: 000006.png is truncated" in err
