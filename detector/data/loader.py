"""Batching: an iteration-based training loader that resumes exactly, and an evaluation loader.

Training reads one endless stream of (index, flip) items, cut into batches of B (as detectron2's
TrainingSampler does: a batch may straddle an epoch boundary, nothing is dropped). Epoch k of the
stream is a permutation of the dataset drawn from a torch.Generator seeded by (seed, k), and
its flips are drawn from the same generator. So the batch of global iteration i is a pure
function of (seed, i, dataset size, batch size): `iter_from(i)` recomputes it without replaying
anything, and worker processes only decode and flip what they are told — their RNG state plays
no part, hence resume is exact for any num_workers.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """[(image, target), ...] -> ([image, ...], [target, ...]); images keep their own sizes."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def epoch_plan(seed: int, epoch: int, num_items: int, flip_prob: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Order (Int64Tensor[n], a permutation) and flips (BoolTensor[n]) of one training epoch."""
    # SeedSequence mixes (seed, epoch) into well-spread 64 bits: seed*C + epoch would make
    # nearby (seed, epoch) pairs collide.
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed((int(state[0]) << 32) | int(state[1]))
    order = torch.randperm(num_items, generator=generator)
    flips = torch.rand(num_items, generator=generator) < flip_prob
    return order, flips


class _StreamBatchSampler:
    """Yields lists of B (index, flip) pairs forever, starting at global iteration start_iter."""

    def __init__(self, num_items: int, batch_size: int, seed: int, flip_prob: float,
                 start_iter: int, part: slice = slice(None)):
        self.num_items, self.batch_size = num_items, batch_size
        self.seed, self.flip_prob, self.start_iter = seed, flip_prob, start_iter
        self.part = part  # the positions of each batch this process loads (data parallelism)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        epoch, offset = divmod(self.start_iter * self.batch_size, self.num_items)
        batch = []
        while True:
            order, flips = epoch_plan(self.seed, epoch, self.num_items, self.flip_prob)
            for index, flip in zip(order[offset:].tolist(), flips[offset:].tolist()):
                batch.append((index, flip))
                if len(batch) == self.batch_size:
                    yield batch[self.part]
                    batch = []
            epoch, offset = epoch + 1, 0


class InfiniteLoader:
    """Endless, exactly resumable training batches.

    Args:
        dataset: map-style dataset indexed by (index, flip) pairs, e.g. `CocoDetection`. Flips
            are drawn only if `dataset.train` is true, with probability `dataset.flip_prob`.
        batch_size: images per batch (B).
        num_workers: decoding worker processes; 0 decodes in the calling process.
        seed: with the epoch number, decides every shuffle and flip.
        rank, world_size: data parallelism: this process loads images [rank·B/W, (rank+1)·B/W)
            of each global batch of B (B must be a multiple of W), so iteration i covers the
            same B images whatever the number of processes.
    """

    def __init__(self, dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError("InfiniteLoader needs a non-empty dataset")
        if batch_size < 1 or num_workers < 0 or seed < 0:
            raise ValueError(f"need batch_size >= 1, num_workers >= 0, seed >= 0; got "
                             f"{batch_size}, {num_workers}, {seed}")
        if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"need 0 <= rank < world_size and batch_size divisible by world_size; got "
                             f"rank {rank}, world_size {world_size}, batch_size {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        share = batch_size // world_size
        self.part = slice(rank * share, (rank + 1) * share)
        self.num_workers = num_workers
        self.seed = seed
        self.flip_prob = float(dataset.flip_prob) if getattr(dataset, "train", False) else 0.0

    def iter_from(self, start_iter: int) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        """Batches of global iterations start_iter, start_iter + 1, ... (never ends).

        One DataLoader iterator serves every epoch, so its workers live as long as the iterator
        (persistent across epochs); dropping the iterator shuts them down.
        """
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        sampler = _StreamBatchSampler(len(self.dataset), self.batch_size, self.seed,
                                      self.flip_prob, start_iter, self.part)
        # Its own generator: creating a DataLoader iterator draws a base seed, which would
        # otherwise come from (and shift) the global torch RNG that the model's samplers use,
        # so a resumed run would diverge from an uninterrupted one.
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            collate_fn=collate,
                            generator=torch.Generator().manual_seed(self.seed + start_iter))
        return iter(loader)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        return self.iter_from(0)


def build_eval_loader(dataset, batch_size: int, num_workers: int,
                      shard: tuple[int, int] = (0, 1)) -> DataLoader:
    """Sequential batches of every item once (the last batch may be short), never flipped.

    `dataset` must not flip on its own: pass one built with train=False. ``shard=(r, W)``: only
    the batches k ≡ r (mod W) of that sequence (distributed evaluation: the same batches, split).
    """
    if getattr(dataset, "train", False):
        raise ValueError("build_eval_loader needs a dataset built with train=False "
                         "(a train=True dataset flips images at random)")
    rank, world = shard
    starts = range(rank * batch_size, len(dataset), world * batch_size)
    batches = [list(range(s, min(s + batch_size, len(dataset)))) for s in starts]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                      # keeps the global torch RNG untouched (a mid-training evaluation must not
                      # change what training samples next)
                      generator=torch.Generator().manual_seed(0),
                      # evaluation runs many times per training run: keep its workers.
                      persistent_workers=num_workers > 0)
