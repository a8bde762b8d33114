"""The single-run trainer: read top to bottom, it is the whole training procedure.

    data → model → SGD with warmup + step LR → iterate (AMP: engine/amp.py) → log → checkpoint → evaluate

Outputs in ``out_dir``: ``config.yaml``, ``checkpoints/model_XXXXXXX.pth`` (atomic), ``log.jsonl``
(every logged step, kept locally whatever the tracking backend does), ``metrics.json`` and
``detections.json`` (COCO results on the validation split).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ioulab.detector import config as C
from ioulab.detector.engine import checkpoint_file as ckpt_io
from ioulab.detector.engine.amp import amp_policy
from ioulab.detector.data.datasets import build_datasets
from ioulab.detector.engine.evaluate import EVAL_ARTIFACTS, evaluate_model
from ioulab.detector.engine.events import NullLogger, RunLogger
from ioulab.detector.data.loader import InfiniteLoader
from ioulab.detector.errors import UserError
from ioulab.detector.model import build_model

# on_checkpoint(iteration, checkpoint path, validation metrics or None)
CheckpointHook = Callable[[int, Path, "dict[str, float] | None"], None]


class NonFiniteLossError(UserError, FloatingPointError):
    pass


@dataclass
class TrainResult:
    metrics: dict[str, float]
    checkpoint: Path
    iterations: int                 # the schedule's total
    seconds_per_iter: float         # over the iterations this call ran
    start: int = 0                  # iterations done before this call (resume), 0 for a fresh run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_iterations(cfg: C.TrainConfig, num_images: int) -> int:
    if cfg.max_iters > 0:
        return cfg.max_iters
    return max(1, math.ceil(cfg.epochs * num_images / cfg.batch_size))


def lr_factor(cfg: C.TrainConfig, total: int) -> Callable[[int], float]:
    """Linear warmup from ``warmup_factor``, then ×gamma at each fraction in ``lr_steps``."""
    steps = [round(f * total) for f in cfg.lr_steps]

    def factor(it: int) -> float:
        warm = 1.0
        if it < cfg.warmup_iters:
            alpha = it / cfg.warmup_iters
            warm = cfg.warmup_factor * (1 - alpha) + alpha
        return warm * cfg.gamma ** sum(it >= s for s in steps)

    return factor


# Normalization layers whose affine parameters ``weight_decay_1d=bias`` exempts (detectron2's list;
# torchvision's FrozenBatchNorm2d holds buffers, not parameters).
NORM_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
              torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
              torch.nn.LayerNorm)


def _decayed(module: torch.nn.Module, param: torch.Tensor, rule: str) -> bool:
    """Whether ``weight_decay`` applies to ``param`` of ``module`` under ``train.weight_decay_1d``."""
    if rule == "none":  # no 1-D parameter: biases and norm weights (Detectron's rule for biases)
        return param.ndim > 1
    if rule == "bias":  # everything but normalization layers (detectron2: WEIGHT_DECAY_NORM = 0)
        return not isinstance(module, NORM_TYPES)
    return True  # all: torch.optim's plain SGD, mmdetection without paramwise_cfg


def param_groups(model: torch.nn.Module, cfg: C.TrainConfig) -> list[dict]:
    """SGD parameter groups of the trainable parameters: ``weight_decay`` where
    ``cfg.weight_decay_1d`` says (else 0) and ``lr`` × ``cfg.bias_lr_factor`` for every parameter
    named ``bias``. One group per (decayed, lr) pair, those at the base LR first (the logged LR is
    group 0's), decayed before exempt: ``none`` with factor 1 gives the two groups of checkpoints
    written before these keys existed, so they resume."""
    groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            scale = cfg.bias_lr_factor if name == "bias" else 1.0
            groups.setdefault((_decayed(module, p, cfg.weight_decay_1d), scale), []).append(p)
    order = sorted(groups, key=lambda k: (k[1] != 1.0, not k[0]))
    return [{"params": groups[k], "weight_decay": cfg.weight_decay if k[0] else 0.0, "lr": cfg.lr * k[1]}
            for k in order]


def build_optimizer(model: torch.nn.Module, cfg: C.TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)


def resume_point(cfg: C.Config, out_dir: str | Path, resume: bool, device: str | torch.device = "cpu",
                 verbose: bool = False) -> tuple[Path | None, dict | None]:
    """The checkpoint a run in ``out_dir`` starts from: ``(path, state)``, or ``(None, None)`` for a
    fresh start. Removes the ``.tmp`` files of a save that was killed; with ``resume``, skips
    unreadable newer checkpoints (saying which with ``verbose``) and refuses a config that changes
    ``train.*`` / ``model.*`` / ``data.*`` values. Raises ``CheckpointError`` (before anything is
    written) when the run cannot start. Cheap enough for a command to call before it opens its
    tracking run."""
    ckpt_dir = Path(out_dir).resolve() / "checkpoints"
    removed = ckpt_io.remove_stale_tmp(ckpt_dir)
    if removed:  # said once: whichever call finds them removes them
        print(f"[ioulab] removed {len(removed)} unfinished checkpoint file(s) of an interrupted save "
              f"in {ckpt_dir}", file=sys.stderr)
    latest = ckpt_io.latest_checkpoint(ckpt_dir)
    if latest is None:
        return None, None
    if not resume:
        raise ckpt_io.CheckpointError(f"{ckpt_dir.parent} already has checkpoints (newest {latest.name}): "
                                      "pass --resume to continue it, or choose another --out")
    path, state, skipped = ckpt_io.newest_intact(ckpt_dir, map_location=device)
    if path is None:
        raise ckpt_io.CheckpointError(f"cannot resume {ckpt_dir.parent}: no checkpoint is readable "
                                      f"({skipped[0][1]})")
    ckpt_io.check_resumable(state, cfg, path)
    if skipped and verbose:
        names = ", ".join(p.name for p, _ in skipped)
        print(f"[ioulab] skipping unreadable checkpoint(s) {names} ({skipped[0][1]}); "
              f"resuming from {path.name}", file=sys.stderr)
    return path, state


def open_log(path: Path, start: int):
    """``log.jsonl`` for appending from iteration ``start``: records of later iterations (logged
    after the checkpoint the run resumes from, before it was interrupted) and a torn last line are
    dropped first, so every iteration appears once."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("iteration"), int) \
                    and record["iteration"] <= start:
                kept.append(line + "\n")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return path.open("a")


def train(cfg: C.Config, out_dir: str | Path, *, logger: RunLogger | None = None, resume: bool = False,
          on_checkpoint: CheckpointHook | None = None, progress: bool = True) -> TrainResult:
    """Train ``cfg`` into ``out_dir``, evaluate on the validation split, return the metrics.

    ``resume=True`` continues from the newest readable checkpoint in ``out_dir`` exactly (weights,
    optimizer, schedule, RNG and data order); ``cfg`` may change only ``inference.*`` keys and
    bookkeeping keys that do not change the result (see :func:`resume_point`).
    """
    out_dir = Path(out_dir).resolve()
    ckpt_dir = out_dir / "checkpoints"
    logger = logger or NullLogger()
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    seed_everything(tcfg.seed)

    train_set, val_set = build_datasets(cfg.data)
    num_classes = cfg.model.num_classes or train_set.num_classes
    model = build_model(cfg.model, num_classes, cfg.inference).to(device)
    optimizer = build_optimizer(model, tcfg)
    total = total_iterations(tcfg, len(train_set))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(tcfg, total))
    amp = amp_policy(tcfg, device)
    scaler = amp.grad_scaler()  # enabled for float16 only

    start = 0
    latest, state = resume_point(cfg, out_dir, resume, device, verbose=True)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):  # empty when saved without float16 AMP
            scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(state["rng"])
        start = state["iteration"]

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(C.dump_yaml(cfg))
    logger.log_params(C.flatten(cfg))
    dataset_info = {"num_classes": num_classes, "label_to_cat_id": list(train_set.label_to_cat_id),
                    "class_names": list(train_set.class_names)}

    def save(iteration: int) -> Path:
        path = ckpt_io.checkpoint_path(ckpt_dir, iteration)
        ckpt_io.save_atomic({
            "format": ckpt_io.FORMAT, "iteration": iteration, "config": C.to_dict(cfg),
            "dataset": dataset_info, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": ckpt_io.rng_state(),
        }, path)
        ckpt_io.prune(ckpt_dir, tcfg.keep_checkpoints)
        return path

    batches = InfiniteLoader(train_set, tcfg.batch_size, cfg.data.num_workers, tcfg.seed).iter_from(start)
    log_file = open_log(out_dir / "log.jsonl", start)
    bar = tqdm(total=total, initial=start, desc="train", disable=not progress, dynamic_ncols=True)
    path = latest if start >= total and latest is not None else None
    metrics: dict[str, float] | None = None
    t_start, it = time.perf_counter(), start
    model.train()
    for it in range(start, total):
        images, targets = next(batches)
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with amp.autocast():
            terms = model(images, targets)
        weighted = model.weighted_losses(terms)
        for name, value in weighted.items():
            if not torch.isfinite(value):
                raise NonFiniteLossError(f"iteration {it + 1}: loss term {name!r} is {value.item()} "
                                         f"(all terms: { {k: round(v.item(), 4) for k, v in terms.items()} })")
        loss = sum(weighted.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tcfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        step = it + 1
        if step % tcfg.log_period == 0 or step == total:
            record = {f"loss/{k.removeprefix('loss_')}": v.item() for k, v in terms.items() if k in weighted}
            record |= {f"loss/{k.removeprefix('loss_')}_weighted": v.item() for k, v in weighted.items()}
            record |= {f"stat/{k}": v.item() for k, v in terms.items() if k not in weighted}
            record |= {"loss/total": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
            logger.log_metrics(record, step)
            log_file.write(json.dumps({"iteration": step, **record}) + "\n")
            log_file.flush()
            bar.set_postfix(loss=f"{loss.item():.3f}", box=f"{terms['loss_box_reg'].item():.3f}")
        bar.update(1)
        if step % tcfg.checkpoint_period == 0 or step == total:
            path = save(step)
            metrics = None
            if tcfg.eval_period > 0 and step % tcfg.eval_period == 0 and step != total:
                metrics = evaluate_model(model, val_set, dataset_info["label_to_cat_id"], cfg.inference,
                                         device, num_workers=cfg.data.num_workers, progress=progress,
                                         amp=amp)
                logger.log_metrics(metrics, step)
                model.train()
            if on_checkpoint is not None and step != total:
                on_checkpoint(step, path, metrics)
    bar.close()
    log_file.close()
    seconds_per_iter = (time.perf_counter() - t_start) / max(it + 1 - start, 1)

    metrics = evaluate_model(model, val_set, dataset_info["label_to_cat_id"], cfg.inference, device,
                             num_workers=cfg.data.num_workers, out_dir=out_dir, progress=progress, amp=amp)
    logger.log_metrics(metrics, total)
    for artifact in ("config.yaml", *EVAL_ARTIFACTS):
        logger.log_artifact(out_dir / artifact)
    if on_checkpoint is not None:
        on_checkpoint(total, path, metrics)
    return TrainResult(metrics, path, total, seconds_per_iter, start)
