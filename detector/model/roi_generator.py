"""IoU-balanced RoI generation: the training RoIs of the IoU head (IoUNet), not RPN proposals.

Shape glossary: G ground-truth boxes of one image, B IoU bins ([0.5, 0.6) … [0.9, 1.0)),
J jitters in the table, R generated RoIs.

A jitter (dx, dy, sw, sh) moves a GT box: cx += w·dx, cy += h·dy, w *= sw, h *= sh. The IoU it
produces does not depend on the GT's size, so one table of jitters binned by IoU serves every GT.

``balance`` picks the table and the sampling rule:

uniform (ioulab's default). The reproduction's grid is badly unbalanced: on its own 31×31×16×16
grid (:func:`reference_grid_jitters`) the bins [0.5, 0.6) … [0.9, 1.0) hold 19170, 7010, 2372, 670
and 79 jitters, and inside each bin the IoUs pile up at the low edge. Here every bin is split into
``SUB_BINS`` equal sub-bins that each hold exactly ``cap / SUB_BINS`` jitters: jitters of ioulab's
grid (:func:`ioulab_grid_jitters`) first (a random subset when there are too many), topped up by
continuous jitters drawn by rejection sampling around the identity. So every bin holds exactly
``cap`` jitters, uniform in IoU at a resolution of 0.1 / SUB_BINS, and every bin gets the same
number of RoIs per GT.

reference (the IoUNet reproduction, OpenMMLab-IoUNet ``RoIGenerator``). The table is the
reproduction's grid binned by IoU, each bin capped at ``cap`` by a random subset (so
[4000, 4000, 2372, 670, 79] with cap 4000). Per image, each bin gives min(its size, n) distinct
jitters, n = ``per_img`` // B + 1 (``per_img``) or ``per_iou``; every chosen jitter is applied to
every GT and ``per_img`` (or ``max_per_img``) of those RoIs are kept at random. With
``per_img=1000`` that is 201, 201, 201, 201 and 79 jitters, so the top bin gets about 9% of the
RoIs instead of 20%.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou, clip_boxes_to_image

BIN_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SUB_BINS = 5


def _jitter_grid(scales: Tensor) -> Tensor:
    """dx, dy ∈ ±linspace(0,1,16)² (31 values, as the reproduction) × sw, sh ∈ ``scales``
    Tensor[S] → Tensor[31·31·S·S, 4]."""
    d = torch.linspace(0, 1, 16, dtype=torch.float64) ** 2
    offsets = torch.cat([-d.flip(0)[:-1], d])
    dx, dy, sw, sh = torch.meshgrid(offsets, offsets, scales, scales, indexing="ij")
    return torch.stack([dx, dy, sw, sh], -1).reshape(-1, 4)


def ioulab_grid_jitters() -> Tensor:
    """ioulab's grid (the seed of the uniform table): the reproduction's offsets, but scales
    symmetric around 1 in log scale: exp(±t²·log √3), t ∈ linspace(−1, 1, 16). Not the
    reproduction's scales (see :func:`reference_grid_jitters`). Returns Tensor[31·31·16·16, 4]."""
    t = torch.linspace(-1, 1, 16, dtype=torch.float64)
    return _jitter_grid(torch.exp(torch.sign(t) * t**2 * math.log(math.sqrt(3.0))))


def reference_grid_jitters() -> Tensor:
    """The IoUNet reproduction's grid (xy_steps=wh_steps=16, area_range (1/3, 3), nonlinearity 2):
    scales s = a + (b − a)·u², u ∈ linspace(0, 1, 16), a = √(1/3), b = √3, so dense near √(1/3)
    and never 1. Returns Tensor[31·31·16·16, 4]."""
    a, b = math.sqrt(1.0 / 3.0), math.sqrt(3.0)
    return _jitter_grid(a + (b - a) * torch.linspace(0, 1, 16, dtype=torch.float64) ** 2)


def jitter_iou(jitters: Tensor) -> Tensor:
    """IoU between the unit GT box and each jittered copy. jitters Tensor[J, 4] → Tensor[J]."""
    dx, dy, sw, sh = jitters.unbind(-1)
    iw = (torch.minimum(dx + sw / 2, torch.full_like(dx, 0.5)) - torch.maximum(dx - sw / 2, torch.full_like(dx, -0.5))).clamp(min=0)
    ih = (torch.minimum(dy + sh / 2, torch.full_like(dy, 0.5)) - torch.maximum(dy - sh / 2, torch.full_like(dy, -0.5))).clamp(min=0)
    inter = iw * ih
    return inter / (1.0 + sw * sh - inter)


def _continuous_jitters(n: int, low_iou: float, generator: torch.Generator) -> Tensor:
    """n random jitters spread around the identity, wide enough to reach IoU ``low_iou``."""
    r = 1.2 * (1.0 - low_iou) + 1e-3
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64) * 2 - 1
    return torch.stack([u[:, 0] * r, u[:, 1] * r, torch.exp(u[:, 2] * r), torch.exp(u[:, 3] * r)], -1)


def build_table(cap: int = 4000, seed: int = 0, balance: str = "uniform") -> list[Tensor]:
    """Per IoU bin a Tensor[Jb, 4] of jitters. uniform: exactly ``cap`` per bin, uniform over
    ``SUB_BINS`` sub-bins; reference: the reproduction's grid, at most ``cap`` per bin.
    Deterministic for a given (cap, seed, balance)."""
    if balance == "reference":
        return _reference_table(cap, seed)
    if cap % SUB_BINS:
        raise ValueError(f"table_cap must be a multiple of {SUB_BINS}, got {cap}")
    per_sub = cap // SUB_BINS
    g = torch.Generator().manual_seed(seed)
    grid = ioulab_grid_jitters()
    grid_iou = jitter_iou(grid)
    table = []
    for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:]):
        parts = []
        edges = torch.linspace(lo, hi, SUB_BINS + 1, dtype=torch.float64)
        for s_lo, s_hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
            chosen = grid[(grid_iou >= s_lo) & (grid_iou < s_hi)]
            chosen = chosen[torch.randperm(len(chosen), generator=g)[:per_sub]]
            while len(chosen) < per_sub:  # top up with continuous jitters (rejection sampling)
                cand = _continuous_jitters(200_000, s_lo, g)
                ious = jitter_iou(cand)
                cand = cand[(ious >= s_lo) & (ious < s_hi)]
                chosen = torch.cat([chosen, cand[: per_sub - len(chosen)]])
            parts.append(chosen)
        table.append(torch.cat(parts).float())
    return table


def _reference_table(cap: int, seed: int) -> list[Tensor]:
    """The reproduction's table: its grid binned by IoU, a random ``cap`` of a bin that has more."""
    g = torch.Generator().manual_seed(seed)
    grid = reference_grid_jitters()
    iou = jitter_iou(grid)
    table = []
    for lo, hi in zip(BIN_EDGES[:-1], BIN_EDGES[1:]):
        chosen = grid[(iou >= lo) & (iou < hi)]
        table.append(chosen[torch.randperm(len(chosen), generator=g)[:cap]].float())
    return table


def apply_jitters(gt: Tensor, jitters: Tensor) -> Tensor:
    """gt Tensor[R, 4] xyxy (one GT per row), jitters Tensor[R, 4] → jittered boxes Tensor[R, 4]."""
    w, h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    cx = (gt[:, 0] + gt[:, 2]) / 2 + w * jitters[:, 0]
    cy = (gt[:, 1] + gt[:, 3]) / 2 + h * jitters[:, 1]
    nw, nh = w * jitters[:, 2], h * jitters[:, 3]
    return torch.stack([cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2], -1)


class IoUBalancedRoIGenerator:
    """Samples jittered RoIs around each GT, balanced over IoU bins.

    Args:
        per_bin_per_gt: ``per_iou`` strategy: N jitters per bin per GT (reduced evenly when
            G·B·N exceeds ``max_per_img``). Mutually exclusive with ``per_img``.
        per_img: ``per_img`` strategy: M RoIs per image spread evenly over bins and GTs.
        max_per_img: cap of the ``per_iou`` strategy.
        table: the per-bin jitter table (:func:`build_table`, same ``balance``).
        balance: uniform (equal RoIs per bin and GT) | reference (the reproduction's rule, see
            the module docstring).
    Sampling uses the global torch RNG, so it is reproduced by the training seed and resumes.
    """

    def __init__(self, table: list[Tensor], per_bin_per_gt: int | None = None, per_img: int | None = None,
                 max_per_img: int = 1000, balance: str = "uniform"):
        if (per_bin_per_gt is None) == (per_img is None):
            raise ValueError("give exactly one of per_bin_per_gt (per_iou) and per_img")
        self.table = table
        self.draw = {"uniform": self._draw_uniform, "reference": self._draw_reference}[balance]
        self.per_bin_per_gt, self.per_img, self.max_per_img = per_bin_per_gt, per_img, max_per_img

    def counts(self, num_gt: int) -> Tensor:
        """RoIs to draw per (GT, bin): Int64Tensor[G, B]."""
        nb = len(self.table)
        if self.per_bin_per_gt is not None:
            n = min(self.per_bin_per_gt, max(1, self.max_per_img // max(num_gt * nb, 1)))
            return torch.full((num_gt, nb), n, dtype=torch.int64)
        base, extra = divmod(self.per_img, num_gt * nb)
        counts = torch.full((num_gt * nb,), base, dtype=torch.int64)
        counts[torch.randperm(num_gt * nb)[:extra]] += 1  # remainder: random cells, still balanced ±1
        return counts.view(num_gt, nb)

    def _draw_uniform(self, num_gt: int) -> tuple[Tensor, Tensor]:
        """(GT index Int64Tensor[R], jitters Tensor[R, 4]): :meth:`counts` jitters per (GT, bin),
        drawn with replacement."""
        counts = self.counts(num_gt)
        gt_index, jitters = [], []
        for b, bin_table in enumerate(self.table):
            n = counts[:, b]
            jitters.append(bin_table[torch.randint(len(bin_table), (int(n.sum()),))])
            gt_index.append(torch.repeat_interleave(torch.arange(num_gt), n))
        return torch.cat(gt_index), torch.cat(jitters)

    def _draw_reference(self, num_gt: int) -> tuple[Tensor, Tensor]:
        """As :meth:`_draw_uniform`, by the reproduction's rule: per bin min(size, n) distinct
        jitters, each applied to every GT, then a random ``per_img`` (``max_per_img``) of them."""
        if self.per_img is not None:
            n, limit = self.per_img // len(self.table) + 1, self.per_img
        else:
            n, limit = self.per_bin_per_gt, self.max_per_img
        chosen = torch.cat([t[torch.randperm(len(t))[:n]] for t in self.table])  # [S, 4]
        pick = torch.randperm(num_gt * len(chosen))[:limit]  # GT-major, as the reproduction
        return pick // len(chosen), chosen[pick % len(chosen)]

    def __call__(self, gt_boxes: Tensor, gt_labels: Tensor, image_size: tuple[int, int]
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """gt_boxes Tensor[G, 4] xyxy, gt_labels Tensor[G], image_size (H, W) →
        (rois Tensor[R, 4], iou targets Tensor[R], labels Tensor[R]). Targets are the IoU of each
        (clipped) RoI with its best-overlapping GT, whose label it takes; only IoU ≥ 0.5 is kept."""
        device = gt_boxes.device
        if gt_boxes.numel() == 0:
            empty = gt_boxes.new_zeros((0, 4))
            return empty, gt_boxes.new_zeros((0,)), gt_labels.new_zeros((0,))
        gt_index, jitters = self.draw(len(gt_boxes))
        gt_index = gt_index.to(device)
        jitters = jitters.to(device=device, dtype=gt_boxes.dtype)
        rois = clip_boxes_to_image(apply_jitters(gt_boxes[gt_index], jitters), image_size)
        ious = box_iou(rois, gt_boxes)
        best, which = ious.max(dim=1)
        keep = best >= 0.5
        return rois[keep], best[keep], gt_labels[which[keep]]
