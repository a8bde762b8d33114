"""The single-run trainer: read :func:`train` top to bottom, it is the whole training procedure.

    build (data, model, SGD with warmup + step LR) → restore → for each iteration: step (AMP:
    engine/amp.py) → log → checkpoint (+ evaluate) → finish (evaluate, artifacts)

One process, or one of N data-parallel workers (engine/distributed.py): the launcher creates the
process group, the trainer reads it; rank 0 writes every file and tracking record.

Outputs in ``out_dir``: ``config.yaml``, ``checkpoints/model_XXXXXXX.pth`` (atomic), ``log.jsonl``
(every logged step, kept locally whatever the tracking backend does), ``metrics.json`` and
``detections.json`` (COCO results on the validation split).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ioulab.detector import config as C
from ioulab.detector.engine import checkpoint_file as ckpt_io
from ioulab.detector.engine.amp import amp_policy
from ioulab.detector.data.datasets import build_datasets
from ioulab.detector.engine import distributed
from ioulab.detector.engine.evaluate import artifact_paths
from ioulab.detector.engine.events import NullLogger, RunLogger
from ioulab.detector.engine.runtime import resolve_device, seed_everything  # noqa: F401  (re-exported)
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


@dataclass
class Session:
    """Everything one training run carries from step to step (built by :func:`build_session`)."""

    cfg: C.Config
    out_dir: Path
    world: distributed.World
    device: torch.device
    model: torch.nn.Module          # the detector itself: state dicts, losses, evaluation
    forward: torch.nn.Module        # what the steps call: ``model``, or DDP over it
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: object                     # engine/amp.py AmpPolicy
    train_set: object
    val_set: object
    dataset_info: dict
    total: int                      # iterations of the schedule
    start: int = 0                  # iterations done before this call
    latest: Path | None = None      # the checkpoint this call resumed from
    logger: RunLogger = field(default_factory=NullLogger)


def build_session(cfg: C.Config, out_dir: Path, world: distributed.World, logger: RunLogger) -> Session:
    """Data, model, optimizer, LR schedule and AMP of ``cfg``, seeded by ``train.seed`` (every rank
    builds the same initial model; rank r > 0 then draws from its own seed)."""
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    seed_everything(tcfg.seed)
    train_set, val_set = build_datasets(cfg.data)
    distributed.per_rank_batch(tcfg.batch_size, world)  # a batch that does not split fails before training
    num_classes = cfg.model.num_classes or train_set.num_classes
    model = build_model(cfg.model, num_classes, cfg.inference).to(device)
    optimizer = build_optimizer(model, tcfg)
    total = total_iterations(tcfg, len(train_set))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(tcfg, total))
    amp = amp_policy(tcfg, device)
    if world.rank:
        seed_everything(rank_seed(tcfg.seed, world.rank))
    info = {"num_classes": num_classes, "label_to_cat_id": list(train_set.label_to_cat_id),
            "class_names": list(train_set.class_names)}
    return Session(cfg, out_dir, world, device, model, model, optimizer, scheduler,
                   amp.grad_scaler(),  # enabled for float16 only
                   amp, train_set, val_set, info, total, logger=logger if world.is_main else NullLogger())


def rank_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of data-parallel rank ``rank`` > 0 (rank 0 keeps ``seed``)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def sample_key(seed: int, iteration: int, position: int) -> int:
    """The sampling seed of the image at ``position`` of the global batch of ``iteration``
    (``train.sampling: per_image``, model/sampling.py)."""
    return int(np.random.SeedSequence([seed, iteration, position]).generate_state(1)[0])


def restore(s: Session, resume: bool) -> None:
    """Load the newest readable checkpoint of ``s.out_dir`` (see :func:`resume_point`) into the
    model, optimizer, schedule, AMP scaler and RNG, and set ``s.start``; nothing for a fresh run.
    Rank 0 reads it and sends it to the other ranks (they may not share the folder); each rank
    gets back its own RNG state when the checkpoint has one per rank."""
    latest, state = None, None
    if s.world.is_main:
        latest, state = resume_point(s.cfg, s.out_dir, resume, s.device, verbose=True)
    latest, state = distributed.broadcast_from_main((latest, state), s.world)
    s.latest = latest
    if state is None:
        return
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if s.scaler.is_enabled() and state.get("scaler"):  # empty when saved without float16 AMP
        s.scaler.load_state_dict(state["scaler"])
    per_rank = state.get("rng_ranks") or []
    if len(per_rank) == s.world.size:
        ckpt_io.set_rng_state(per_rank[s.world.rank])
    elif s.world.is_main:
        ckpt_io.set_rng_state(state["rng"])
    else:  # another world size: rank r > 0 continues from its own seed and the iteration
        seed_everything(rank_seed(s.cfg.train.seed + state["iteration"], s.world.rank))
    s.start = state["iteration"]


def step(s: Session, it: int, images: list[torch.Tensor], targets: list[dict]
         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Iteration ``it`` on this rank's images: forward, loss check (on every rank), backward
    (gradients averaged over the ranks), clip, SGD and LR step. Returns (terms, weighted, loss)."""
    tcfg = s.cfg.train
    images = [img.to(s.device, non_blocking=True) for img in images]
    targets = [{k: (v.to(s.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    if tcfg.sampling == "per_image":
        first = s.world.rank * len(images)
        for j, t in enumerate(targets):
            t["sample_key"] = sample_key(tcfg.seed, it, first + j)
    with s.amp.autocast():
        terms = s.forward(images, targets)
    weighted = s.model.weighted_losses(terms)
    if not distributed.all_finite(list(weighted.values()), s.world):
        bad = [(k, v.item()) for k, v in weighted.items() if not torch.isfinite(v)]
        where = f"loss term {bad[0][0]!r} is {bad[0][1]}" if bad else \
            f"the loss of another of {s.world.size} workers is not finite"
        raise NonFiniteLossError(f"iteration {it + 1}: {where} "
                                 f"(all terms: { {k: round(v.item(), 4) for k, v in terms.items()} })")
    loss = sum(weighted.values())
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    if tcfg.grad_clip > 0:
        s.scaler.unscale_(s.optimizer)
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), tcfg.grad_clip)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.scheduler.step()
    return terms, weighted, loss


def log_step(s: Session, step_no: int, terms: dict, weighted: dict, loss: torch.Tensor, log_file, bar) -> None:
    """One ``log.jsonl`` line and one tracking record of the losses (each averaged over the ranks:
    what one process over the global batch logs), statistics and LR; rank 0 writes them."""
    values = {f"loss/{k.removeprefix('loss_')}": v for k, v in terms.items() if k in weighted}
    values |= {f"loss/{k.removeprefix('loss_')}_weighted": v for k, v in weighted.items()}
    values |= {f"stat/{k}": v for k, v in terms.items() if k not in weighted}
    values["loss/total"] = loss
    record = distributed.mean_over_ranks(values, s.world) | {"lr": s.optimizer.param_groups[0]["lr"]}
    if not s.world.is_main:
        return
    s.logger.log_metrics(record, step_no)
    log_file.write(json.dumps({"iteration": step_no, **record}) + "\n")
    log_file.flush()
    bar.set_postfix(loss=f"{record['loss/total']:.3f}", box=f"{record['loss/box_reg']:.3f}")


def save_checkpoint(s: Session, iteration: int) -> Path:
    """Rank 0 writes ``checkpoints/model_XXXXXXX.pth`` atomically (every rank's RNG state in it)
    and prunes old ones; every rank returns its path once it exists."""
    path = ckpt_io.checkpoint_path(s.out_dir / "checkpoints", iteration)
    rng_ranks = distributed.gather_to_main(ckpt_io.rng_state(), s.world)
    if s.world.is_main:
        state = {
            "format": ckpt_io.FORMAT, "iteration": iteration, "config": C.to_dict(s.cfg),
            "dataset": s.dataset_info, "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
            "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(), "rng": rng_ranks[0]}
        if s.world.size > 1:
            state["rng_ranks"] = rng_ranks
        ckpt_io.save_atomic(state, path)
        ckpt_io.prune(path.parent, s.cfg.train.keep_checkpoints)
    distributed.barrier(s.world)
    return path


def evaluate(s: Session, out_dir: Path | None = None, progress: bool = False) -> dict[str, float]:
    """Validation metrics of the current weights, the images split over the ranks (same metrics
    as one process); ``out_dir``: rank 0 writes the EVAL_ARTIFACTS there."""
    metrics = distributed.evaluate_sharded(s.model, s.val_set, s.dataset_info["label_to_cat_id"], s.cfg.inference,
                                 s.device, s.world, num_workers=s.cfg.data.num_workers, out_dir=out_dir,
                                 progress=progress, amp=s.amp)
    s.model.train()
    return metrics


def finish(s: Session, path: Path | None, on_checkpoint: CheckpointHook | None, seconds_per_iter: float,
           progress: bool) -> TrainResult:
    """The final evaluation (its files in ``out_dir``), its metrics and the artifacts logged, the
    last hook call; returns the run's result."""
    metrics = evaluate(s, out_dir=s.out_dir if s.world.is_main else None, progress=progress)
    s.logger.log_metrics(metrics, s.total)
    for artifact in artifact_paths(s.out_dir) if s.world.is_main else []:
        s.logger.log_artifact(artifact)
    if on_checkpoint is not None:
        on_checkpoint(s.total, path, metrics)
    return TrainResult(metrics, path, s.total, seconds_per_iter, s.start)


def train(cfg: C.Config, out_dir: str | Path, *, logger: RunLogger | None = None, resume: bool = False,
          on_checkpoint: CheckpointHook | None = None, progress: bool = True) -> TrainResult:
    """Train ``cfg`` into ``out_dir``, evaluate on the validation split, return the metrics.

    ``resume=True`` continues from the newest readable checkpoint in ``out_dir`` exactly (weights,
    optimizer, schedule, RNG and data order); ``cfg`` may change only ``inference.*`` keys and
    bookkeeping keys that do not change the result (see :func:`resume_point`). Inside an
    initialized process group this is one data-parallel worker (engine/distributed.py): every rank
    calls it with the same arguments; ``logger`` and files are rank 0's, ``on_checkpoint`` is
    called on every rank at the same iterations.
    """
    world = distributed.World.current()
    s = build_session(cfg, Path(out_dir).resolve(), world, logger or NullLogger())
    restore(s, resume)
    s.forward = distributed.wrap_model(s.model, world, s.device)
    tcfg = cfg.train
    if world.is_main:
        s.out_dir.mkdir(parents=True, exist_ok=True)
        (s.out_dir / "config.yaml").write_text(C.dump_yaml(cfg))
        s.logger.log_params(C.flatten(cfg))
    batches = InfiniteLoader(s.train_set, tcfg.batch_size, cfg.data.num_workers, tcfg.seed,
                             rank=world.rank, world_size=world.size).iter_from(s.start)
    log_file = open_log(s.out_dir / "log.jsonl", s.start) if world.is_main else None
    bar = tqdm(total=s.total, initial=s.start, desc="train", disable=not (progress and world.is_main),
               dynamic_ncols=True)
    path = s.latest if s.start >= s.total and s.latest is not None else None
    t_start, it = time.perf_counter(), s.start
    s.model.train()
    for it in range(s.start, s.total):
        terms, weighted, loss = step(s, it, *next(batches))
        step_no = it + 1
        if step_no % tcfg.log_period == 0 or step_no == s.total:
            log_step(s, step_no, terms, weighted, loss, log_file, bar)
        bar.update(1)
        if step_no % tcfg.checkpoint_period == 0 or step_no == s.total:
            path = save_checkpoint(s, step_no)
            metrics = None
            if tcfg.eval_period > 0 and step_no % tcfg.eval_period == 0 and step_no != s.total:
                metrics = evaluate(s, progress=progress and world.is_main)
                s.logger.log_metrics(metrics, step_no)
            if on_checkpoint is not None and step_no != s.total:
                on_checkpoint(step_no, path, metrics)
    bar.close()
    if log_file is not None:
        log_file.close()
    seconds_per_iter = (time.perf_counter() - t_start) / max(it + 1 - s.start, 1)
    return finish(s, path, on_checkpoint, seconds_per_iter, progress and world.is_main)
