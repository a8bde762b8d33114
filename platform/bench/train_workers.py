"""`ioulab bench train --workers 1,2`: data-parallel scaling of training on this machine.

One group of W processes per value of ``--workers`` (DDP over gloo on 127.0.0.1, one torch thread
per process), all alive for the whole run and each holding the same pre-loaded global batches of
``train.batch_size`` images, split over its W ranks as the trainer splits them. The groups take
turns in rounds (rows interleaved, so a change of machine load hits every row alike); an idle
group waits on its queue and uses no CPU. Per row: s/iter, images/s and scaling efficiency =
(s/iter of 1 worker / s/iter of W workers) / W — 100 % is ideal, the rest is all-reduce and
coordination (and, on a shared machine, contention).
"""
from __future__ import annotations

import torch

from ioulab.detector import config as C
from ioulab.platform.bench.common import BenchResult


def parse_workers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"ioulab bench train: --workers expects whole numbers >= 1 like 1,2; got {text!r}")
    return values


def _group_member(rank: int, world: int, port: int, cfg_dict: dict, commands, results) -> None:
    """Rank ``rank`` of a group: build, then time ``n`` steps per command until None."""
    import torch.distributed as dist

    from ioulab.detector.engine import distributed
    from ioulab.platform.bench.train import bench_batches, seeded_stepper

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = C.from_dict(cfg_dict)
    batches, num_classes = bench_batches(cfg, rank, world)
    stepper = seeded_stepper(cfg, num_classes, batches, wrap=lambda model: distributed.wrap_model(
        model, distributed.World(rank, world), torch.device("cpu")))
    results.put(("ready", rank))
    for n in iter(commands[rank].get, None):
        dist.barrier()
        seconds = stepper.timed(n)
        dist.barrier()
        if rank == 0:
            results.put(("timed", seconds))
    dist.destroy_process_group()


class _Group:
    """W spawned processes of one DDP world, driven through queues."""

    def __init__(self, ctx, world: int, cfg: C.Config):
        from ioulab.platform.commands.launch import free_port

        self.world = world
        self.commands = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_group_member, args=(r, world, port, C.to_dict(cfg), self.commands,
                                                             self.results)) for r in range(world)]
        for p in self.procs:
            p.start()
        for _ in range(world):
            self.results.get(timeout=600)

    def timed(self, n: int) -> float:
        for q in self.commands:
            q.put(n)
        kind, seconds = self.results.get(timeout=3600)
        return seconds

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def run(args) -> BenchResult:
    from ioulab.detector.engine.distributed import World, per_rank_batch
    from ioulab.platform.bench.train import _seconds_per_step

    cfg = C.load_config(args.config, args.overrides)
    sizes = parse_workers(args.workers)
    for w in sizes:
        per_rank_batch(cfg.train.batch_size, World(0, w))
    ctx = torch.multiprocessing.get_context("spawn")
    groups = [_Group(ctx, w, cfg) for w in sizes]
    try:
        seconds = _seconds_per_step(groups, args.warmup, args.iters)
    finally:
        for g in groups:
            g.close()
    base = dict(zip(sizes, seconds)).get(1)
    batch = cfg.train.batch_size
    rows = [{"model": f"ours {args.config or C.DEFAULT_PRESET}", "workers": w, "s/iter": sec, "images/s": batch / sec,
             "efficiency %": 100 * base / sec / w if base else float("nan")} for w, sec in zip(sizes, seconds)]
    notes = [f"global batch {batch} split over the workers, images {cfg.model.min_size}px, 1 thread per worker, "
             f"DDP over gloo on 127.0.0.1; {args.iters} timed iterations after {args.warmup} warmup, rows "
             "interleaved in rounds; efficiency: (s/iter of 1 worker / s/iter of W) / W (100 = ideal)"]
    return BenchResult("training scaling over data-parallel workers (CPU)", ["model", "workers", "s/iter", "images/s",
                       "efficiency %"], rows, notes)
