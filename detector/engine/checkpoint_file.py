"""Checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python primitives: ``model``, ``optimizer``,
``scheduler``, ``scaler`` (state dicts; ``scaler`` is the float16 AMP GradScaler's, empty when
it is disabled), ``iteration`` (iterations completed), ``rng`` (torch / numpy / random
states), ``config`` (``config.to_dict``), ``dataset`` (num_classes, label_to_cat_id, class_names),
and ``format``.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ioulab.detector import config as C
from ioulab.detector.errors import UserError

FORMAT = "ioulab-checkpoint-1"
_NAME = re.compile(r"^model_(\d{7})\.pth$")
_TMP = re.compile(r"^\.model_\d{7}\.pth\..*\.tmp$")  # what save_atomic leaves when killed mid-save
# Keys that may change on --resume without changing the result (any other train.*, model.*, data.*
# key may not: the checkpoint's optimizer and schedule were made with the stored values).
RESUME_FREE_KEYS = frozenset({"train.device", "train.keep_checkpoints", "data.num_workers"})
RESUME_PREFIXES = ("train.", "model.", "data.")


class CheckpointError(UserError, RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # weights_only loading accepts tensors and primitives, not numpy arrays.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_tuplify(state["python"]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves a
    truncated checkpoint under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_path(ckpt_dir: Path, iteration: int) -> Path:
    return ckpt_dir / f"model_{iteration:07d}.pth"


def checkpoint_iteration(path: Path) -> int | None:
    """The iteration in a checkpoint's file name (``model_0001500.pth`` -> 1500), else None."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if _NAME.match(p.name))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune(ckpt_dir: Path, keep: int) -> None:
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def check_file(path: str | os.PathLike) -> Path:
    """Cheap checks (no unpickling) that ``path`` can be a checkpoint: it exists and is a complete
    zip archive, as ``torch.save`` writes. Anything else (a text file, a truncated copy) would
    otherwise fail deep in the unpickler with a message naming neither the file nor the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        kind = "an empty file" if path.stat().st_size == 0 else "not a complete torch.save archive"
        raise CheckpointError(f"cannot read checkpoint {path}: {kind} (truncated, or not a checkpoint)")
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = check_file(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt member, foreign pickle, ...
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}"
                              f"{': ' + detail if detail else ''}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ioulab checkpoint (format {FORMAT})")
    return ckpt


def remove_stale_tmp(ckpt_dir: Path) -> list[Path]:
    """Delete the temporary files of saves that were killed midway; returns what was removed."""
    if not ckpt_dir.is_dir():
        return []
    stale = sorted(p for p in ckpt_dir.iterdir() if _TMP.match(p.name))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def newest_intact(ckpt_dir: Path, map_location: str | torch.device = "cpu"
                  ) -> tuple[Path | None, dict | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads: ``(path, state, skipped)``, ``skipped`` listing the newer
    unreadable ones with the reason; ``(None, None, skipped)`` when none loads."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return path, load(path, map_location), skipped
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
    return None, None, skipped


def check_resumable(ckpt: dict, cfg: C.Config, path: Path) -> None:
    """Raise if ``cfg`` changes a ``train.*``, ``model.*`` or ``data.*`` value the checkpoint was
    made with (``inference.*`` and :data:`RESUME_FREE_KEYS` may change)."""
    stored = C.from_dict(ckpt["config"], source=f"{path} (stored config)")
    changed = {k: v for prefix in RESUME_PREFIXES for k, v in C.diff(stored, cfg, prefix).items()
               if k not in RESUME_FREE_KEYS}
    if changed:
        lines = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in sorted(changed.items()))
        raise CheckpointError(f"cannot resume from {path}: the config changes {lines}; resume with the "
                              "checkpoint's values, or train into a new --out")


def check_compatible(ckpt: dict, cfg: C.Config, path: Path, prefix: str = "model.") -> None:
    """Raise if the checkpoint was made with a different ``prefix`` part of the config."""
    stored = C.from_dict(ckpt["config"], source=f"{path} (stored config)")
    changed = C.diff(stored, cfg, prefix)
    if changed:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(changed.items()))
        raise CheckpointError(f"checkpoint {path} was made with a different config ({lines})")
