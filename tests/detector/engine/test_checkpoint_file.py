"""Checkpoint files a user can get wrong: foreign or broken files, stale temporaries, resume with a
changed config."""
import zipfile

import pytest
import torch

from ioulab.detector import config as C
from ioulab.detector.engine import checkpoint_file as ckpt_io


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def test_text_file_is_named_and_explained(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("epoch 12: looks good\n")
    with pytest.raises(ckpt_io.CheckpointError) as exc_info:
        ckpt_io.load(text)
    msg = _one_line(exc_info)
    assert str(text) in msg and "not a complete torch.save archive" in msg
    assert not msg.rstrip().endswith(": 101")  # the unpickler's opcode used to be the whole message


def test_empty_and_truncated_files_are_named(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ckpt_io.CheckpointError, match=r"empty\.pth: an empty file") as exc_info:
        ckpt_io.load(empty)
    _one_line(exc_info)
    whole = tmp_path / "whole.pth"
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "w": torch.arange(10000.0)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ckpt_io.CheckpointError, match=r"cut\.pth: not a complete torch.save archive"):
        ckpt_io.load(cut)
    assert ckpt_io.load(whole)["w"].shape == (10000,)


def test_zip_that_is_no_checkpoint_gives_one_line(tmp_path):
    bogus = tmp_path / "bogus.pth"
    with zipfile.ZipFile(bogus, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(ckpt_io.CheckpointError, match=r"cannot read checkpoint .*bogus\.pth: \w+") as exc_info:
        ckpt_io.load(bogus)
    _one_line(exc_info)


def test_remove_stale_tmp_only_removes_interrupted_saves(tmp_path):
    keep = [tmp_path / "model_0000002.pth", tmp_path / "notes.tmp", tmp_path / ".other.pth.x.tmp"]
    stale = [tmp_path / ".model_0000004.pth.k3j2h1.tmp", tmp_path / ".model_0000006.pth.abc.tmp"]
    for p in keep + stale:
        p.write_bytes(b"x")
    assert ckpt_io.remove_stale_tmp(tmp_path) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert ckpt_io.remove_stale_tmp(tmp_path / "missing") == []


def test_stale_tmp_pattern_matches_what_save_atomic_writes(tmp_path, monkeypatch):
    """The name a save leaves behind when the process dies between write and rename."""
    seen = []
    real_replace = ckpt_io.os.replace
    monkeypatch.setattr(ckpt_io.os, "replace", lambda src, dst: seen.append(src) or real_replace(src, dst))
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT}, ckpt_io.checkpoint_path(tmp_path, 4))
    (tmp_name,) = seen
    assert ckpt_io._TMP.match(ckpt_io.Path(tmp_name).name)


def test_newest_intact_skips_broken_newer_files(tmp_path):
    for it in (2, 4, 6):
        ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "iteration": it}, ckpt_io.checkpoint_path(tmp_path, it))
    ckpt_io.checkpoint_path(tmp_path, 6).write_text("garbage")
    path, state, skipped = ckpt_io.newest_intact(tmp_path)
    assert path.name == "model_0000004.pth" and state["iteration"] == 4
    assert [p.name for p, _ in skipped] == ["model_0000006.pth"]
    for it in (2, 4):
        ckpt_io.checkpoint_path(tmp_path, it).write_bytes(b"")
    assert ckpt_io.newest_intact(tmp_path)[:2] == (None, None)


def _stored(**changes) -> dict:
    cfg = C.Config()
    C.apply_overrides(cfg, changes)
    return {"config": C.to_dict(cfg)}


def test_check_resumable_lists_changed_train_model_data_keys(tmp_path):
    now = C.Config()
    C.apply_overrides(now, {"train.lr": 0.5, "model.pool_size": 5, "data.root": "/elsewhere"})
    with pytest.raises(ckpt_io.CheckpointError) as exc_info:
        ckpt_io.check_resumable(_stored(), now, tmp_path / "model_0000002.pth")
    msg = _one_line(exc_info)
    assert "model_0000002.pth" in msg
    for part in ("train.lr (0.02 -> 0.5)", "model.pool_size (7 -> 5)", "data.root"):
        assert part in msg, msg


def test_check_resumable_allows_inference_and_bookkeeping_keys(tmp_path):
    now = C.Config()
    C.apply_overrides(now, {"inference.score_thresh": 0.3, "inference.nms.type": "diou",
                            "train.device": "cpu", "train.keep_checkpoints": 5, "data.num_workers": 0})
    ckpt_io.check_resumable(_stored(), now, tmp_path / "model_0000002.pth")
