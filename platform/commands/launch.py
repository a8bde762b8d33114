"""`ioulab train --workers N` on one machine: N data-parallel processes of the detector's trainer.

Launcher: ``torch.multiprocessing`` (spawn) with a TCP rendezvous on 127.0.0.1 — gloo on CPU,
nccl on CUDA (rank r on ``cuda:r``) — not Ray Train. One machine needs no Ray runtime (5–9 s to
start here) nor a Train worker group (~20–30 s); and rank 0 is *this* process, so the MLflow run,
Ctrl-C, the exit code and the run folder are exactly those of a single-process ``ioulab train``.
Sweeps, which do span machines, use Ray Train's ``TorchTrainer`` (platform/sweep/trainable.py).

Ranks 1..N-1 are child processes that die with this one (``PR_SET_PDEATHSIG``: a SIGKILLed run
leaves no orphan stuck in a collective), and a child that fails stops the run with one line.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ioulab.detector import config as C
from ioulab.detector.engine.distributed import World, per_rank_batch
from ioulab.detector.errors import UserError

# A collective waits at most this long for a rank (a rank stuck elsewhere fails the run, not hangs it).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank``: ``cuda``/``auto`` with a GPU → ``cuda:<rank>``, else ``device``."""
    if device in ("cuda", "auto") and torch.cuda.is_available():
        if rank >= torch.cuda.device_count():
            raise UserError(f"--workers needs one GPU per worker; this machine has {torch.cuda.device_count()}")
        return f"cuda:{rank}"
    return device


def init_group(rank: int, world: int, port: int, device: str) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent dies."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out: str, resume: bool, threads: int) -> None:
    """Rank ``rank`` > 0: the same training as rank 0, no logger, no progress bar."""
    from ioulab.detector.engine.train import train

    _die_with_parent()
    torch.set_num_threads(threads)
    cfg = C.from_dict(cfg_dict, source="ioulab train --workers")
    cfg.train.device = rank_device(cfg.train.device, rank)
    try:
        init_group(rank, world, port, cfg.train.device)
        train(cfg, out, resume=resume, progress=False)
    except UserError as exc:
        print(f"[ioulab] worker {rank}: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _watch(procs) -> None:
    """Stop the whole run (this process too) as soon as a worker exits with an error: rank 0 would
    otherwise wait for it inside a collective."""
    for p in procs:
        p.join()
        if p.exitcode:
            print(f"[ioulab] worker process {p.name} exited with code {p.exitcode}; stopping the run",
                  file=sys.stderr)
            for other in procs:
                if other.is_alive():
                    other.kill()
            os._exit(1)


def train_workers(cfg: C.Config, out: Path, workers: int, *, resume: bool, logger=None,
                  progress: bool = True):
    """``engine.train.train`` on ``workers`` processes of this machine (1: this process alone), each
    with its share of this process's torch threads. Returns rank 0's TrainResult."""
    from ioulab.detector.engine.train import train

    if workers == 1:
        return train(cfg, out, logger=logger, resume=resume, progress=progress)
    per_rank_batch(cfg.train.batch_size, World(0, workers))  # one line now, before any process starts
    threads = max(1, torch.get_num_threads() // workers)
    port = free_port()
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, name=f"rank{r}",
                         args=(r, workers, port, C.to_dict(cfg), str(out), resume, threads))
             for r in range(1, workers)]
    for p in procs:
        p.start()
    threading.Thread(target=_watch, args=(procs,), daemon=True).start()
    torch.set_num_threads(threads)
    cfg.train.device = rank_device(cfg.train.device, 0)
    try:
        init_group(0, workers, port, cfg.train.device)
        return train(cfg, out, logger=logger, resume=resume, progress=progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
