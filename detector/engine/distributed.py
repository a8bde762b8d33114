"""Data-parallel training and evaluation across processes (``torch.distributed``).

A :class:`World` says which of ``size`` processes this one is. The launcher (``ioulab train
--workers N``: ``platform/commands/launch.py``; a sweep trial: Ray Train's ``TorchTrainer``)
creates the process group; the engine only reads it (:meth:`World.current`) and does, per step:

    global batch of B images (iteration i)  →  rank r takes images [r·B/N, (r+1)·B/N)
    forward/backward on B/N images  →  DDP all-reduces (averages) the gradients  →  same SGD step

Each rank's loss is a mean over its own images, so the averaged gradient is the gradient of the
mean over the B images and the learning rate stays the config's (it is for the global batch).
Rank 0 alone writes checkpoints, ``log.jsonl`` and tracking records; every rank runs the same
number of steps, evaluations and hooks (a collective that one rank skips hangs the others).

Normalization: FrozenBatchNorm (``model.backbone.norm: frozen_bn``) has no batch statistics, so a
step is the same at any world size. Trainable BatchNorm (``bn``) becomes SyncBatchNorm on CUDA;
on CPU SyncBatchNorm does not run (torch: "expected input tensor to be on GPU"), so each rank
normalizes over its own B/N images (what plain DDP does) and N workers are not equivalent to one.

Evaluation: rank r predicts the batches k ≡ r (mod N) of the evaluation loader (the same batches a
single process forms, so every image is computed in the same batch), the detections are gathered
to rank 0 and put back in dataset order, and rank 0 scores them through the single-process path
(``evaluate.score``); the metrics are then sent to every rank. The forward time
(``time/infer_ms_per_image``) is measured on every rank over its own batches (its first batch left
out as warm-up when it has more than one) and combined on rank 0 as Σ seconds / Σ images over the
ranks: the mean over the ranks, weighted by the images each timed. The ranks run at the same time
and may share the machine, so it is the per-image forward time under that load, not a throughput.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ioulab.detector.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel workers: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "World":
        """The initialized process group's rank and size; a single process without one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def per_rank_batch(batch_size: int, world: World) -> int:
    """Images per rank of a global batch of ``batch_size``: it must split evenly."""
    if batch_size % world.size:
        raise UserError(f"train.batch_size={batch_size} does not split over {world.size} workers: "
                        f"use a multiple of {world.size}")
    return batch_size // world.size


def wrap_model(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` itself for one process; else DistributedDataParallel over it (BatchNorm → SyncBatchNorm
    on CUDA, see the module docstring). Parameters and buffers start as rank 0's (DDP broadcasts them)."""
    if world.size == 1:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)


def all_finite(values: list[torch.Tensor], world: World) -> bool:
    """Whether every value is finite on every rank (one all-reduce: a rank that raised alone would
    leave the others waiting in the gradient all-reduce)."""
    # one device-side reduction and one host sync per step, not one per loss term
    ok = torch.isfinite(torch.stack([v.detach().float() for v in values])).all().float().cpu().reshape(1)
    if world.size > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def mean_over_ranks(values: dict[str, torch.Tensor], world: World) -> dict[str, float]:
    """Each scalar averaged over the ranks (what one process over the global batch would log, when
    every rank's value is a mean over the same number of samples)."""
    if world.size == 1:
        return {k: v.item() for k, v in values.items()}
    keys = list(values)
    stacked = torch.stack([values[k].detach().double().cpu() for k in keys])
    dist.all_reduce(stacked)
    stacked /= world.size
    return dict(zip(keys, stacked.tolist()))


def gather_to_main(obj, world: World) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj, world: World):
    """Rank 0's ``obj`` on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def evaluate_sharded(model, dataset, label_to_cat_id: list[int], inference, device, world: World,
                     num_workers: int = 0, out_dir=None, progress: bool = True, amp=None) -> dict[str, float]:
    """``evaluate.evaluate_model`` split over the ranks (see the module docstring): same detections
    and AP metrics, same files (written by rank 0), returned on every rank; the forward time is
    the ranks' combined (Σ seconds / Σ images)."""
    from ioulab.detector.data.loader import build_eval_loader
    from ioulab.detector.engine.evaluate import ForwardTime, predict, score

    if world.size == 1:
        from ioulab.detector.engine.evaluate import evaluate_model

        return evaluate_model(model, dataset, label_to_cat_id, inference, device, num_workers=num_workers,
                              out_dir=out_dir, progress=progress, amp=amp)
    loader = build_eval_loader(dataset, inference.batch_size, num_workers, shard=(world.rank, world.size))
    forward_time = ForwardTime()
    mine = predict(model, loader, device, label_to_cat_id, progress=progress and world.is_main, amp=amp,
                   forward_time=forward_time)
    shards = gather_to_main((mine, forward_time), world)
    metrics = None
    if world.is_main:
        position = {image_id: i for i, image_id in enumerate(dataset.ids)}
        # stable: an image's detections stay in the model's order, images go back to dataset order
        detections = sorted((d for shard, _ in shards for d in shard), key=lambda d: position[d["image_id"]])
        metrics = score(dataset.coco, detections, out_dir, ForwardTime.total(t for _, t in shards))
    return broadcast_from_main(metrics, world)
