"""Anchor / RoI sampling whose random draws belong to the image, not to the process.

torchvision's ``BalancedPositiveNegativeSampler`` draws every image's sample from the process's
global torch RNG, one image after the other: which anchors image 5 of a batch gets depends on what
images 0-4 drew before it in the same process. Under data parallelism rank 1 starts its images
from a different RNG state than a single process would, so N workers cannot reproduce one worker.
:class:`KeyedSampler` draws image j's sample from a generator seeded by that image's key (the
trainer derives it from (seed, iteration, position in the global batch), ``train.sampling:
per_image``); without keys it is torchvision's sampler, draw for draw.

Shapes: per image, ``matched_idxs`` Int64Tensor[A] (-1 ignore, 0 negative, >= 1 positive) →
masks UInt8Tensor[A] of the chosen positives and negatives.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler


class KeyedSampler(BalancedPositiveNegativeSampler):
    """``batch_size_per_image`` samples per image, ``positive_fraction`` of them positive at most."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        super().__init__(batch_size_per_image, positive_fraction)
        self.keys: list[int] | None = None  # set for one forward by :func:`keyed`

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        if self.keys is None:
            return super().__call__(matched_idxs)
        if len(self.keys) != len(matched_idxs):
            raise ValueError(f"{len(self.keys)} sampling keys for {len(matched_idxs)} images")
        pos, neg = [], []
        for key, matched in zip(self.keys, matched_idxs):
            p, n = self._one(matched, torch.Generator().manual_seed(key))
            pos.append(p)
            neg.append(n)
        return pos, neg

    def _one(self, matched: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """torchvision's per-image rule, with the permutations drawn (on CPU) from ``generator``."""
        positive = torch.where(matched >= 1)[0]
        negative = torch.where(matched == 0)[0]
        num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
        num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
        perm1 = torch.randperm(positive.numel(), generator=generator)[:num_pos].to(matched.device)
        perm2 = torch.randperm(negative.numel(), generator=generator)[:num_neg].to(matched.device)
        pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
        neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
        pos_mask[positive[perm1]] = 1
        neg_mask[negative[perm2]] = 1
        return pos_mask, neg_mask


def keyed_copy(sampler: BalancedPositiveNegativeSampler) -> KeyedSampler:
    return KeyedSampler(sampler.batch_size_per_image, sampler.positive_fraction)


@contextlib.contextmanager
def keyed(samplers: list[KeyedSampler], keys: list[int] | None):
    """Within the block, ``samplers`` draw image j's sample from ``keys[j]`` (None: the global RNG)."""
    for s in samplers:
        s.keys = keys
    try:
        yield
    finally:
        for s in samplers:
            s.keys = None
