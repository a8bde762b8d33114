"""A COCO box evaluator that equals pycocotools, split into *match once* and *accumulate often*.

``match`` runs the per-image greedy matching of COCOeval (pycocotools' ``evaluateImg``) — through
faster-coco-eval's C++ ``COCOevalEvaluateImages`` when it is installed, else pycocotools itself —
and keeps the result as flat numpy arrays. ``Accumulator`` turns those arrays into the COCO
metrics for any *image weights*: weights of ones give pycocotools' numbers (tests check 1e-6);
integer weights from a bootstrap resample give the metrics of that resample (an image drawn
twice counts twice) without matching again. That is what makes a 1000-resample bootstrap cheap.

Glossary:
    I  images (in ``image_ids`` order)     K  categories (sorted ids)
    T  IoU thresholds (.50:.05:.95)        A  area ranges: all, small, medium, large
    N  detections of one area range, after COCOeval's per-(image, category) top-100 cut, in
       accumulation order: category-major, then score descending (stable, ties by image order)
    B  weight vectors (bootstrap resamples) evaluated at once

Why only true positives are kept as points of the precision/recall curve: a false positive
lowers precision without moving recall, so it can never be the first point at a recall
threshold, nor the maximum of the interpolated (right-to-left maximum) precision; it only
enters through the running count of scored detections. Each category's AP at one threshold is
``sum_p envelope(p) * (#recall thresholds first reached at p) / 101`` over its true positives.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from itertools import chain

import numpy as np

METRIC_KEYS = ["AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90", "APs", "APm", "APl"]
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
AREA_NAMES = ("all", "small", "medium", "large")
AREA_RANGES = ((0.0, 1e10), (0.0, 32.0 ** 2), (32.0 ** 2, 96.0 ** 2), (96.0 ** 2, 1e10))
AREA_OF_METRIC = {"APs": 1, "APm": 2, "APl": 3}
THRESHOLD_OF_METRIC = {"AP50": 0, "AP60": 2, "AP70": 4, "AP75": 5, "AP80": 6, "AP90": 8}


def areas_needed(metrics) -> list[int]:
    return sorted({AREA_OF_METRIC.get(m, 0) for m in metrics})


@dataclass
class AreaMatches:
    """Matching results of one area range (shapes: N detections, T thresholds, I x K)."""

    category: np.ndarray     # [N] int   category index k
    image: np.ndarray        # [N] int   image index i
    score: np.ndarray        # [N] float
    tp: np.ndarray           # [T, N] bool  matched to a non-ignored ground truth
    ignored: np.ndarray      # [T, N] bool  COCOeval's dtIgnore
    num_gt: np.ndarray       # [I, K] int   non-ignored ground truths


@dataclass
class Matches:
    """``match`` output: one :class:`AreaMatches` per area range, and a digest of the ground
    truth they were matched against (two runs compare image by image only when it is equal)."""

    image_ids: list[int]
    category_ids: list[int]
    areas: list[AreaMatches | None]   # per AREA_NAMES; None where not computed
    gt_digest: str = ""

    def save(self, path) -> None:
        """A compressed ``.npz`` (what an evaluation logs as ``eval_matches.npz``)."""
        with open(path, "wb") as f:
            np.savez_compressed(f, **self.arrays())

    @classmethod
    def load(cls, path) -> "Matches":
        with np.load(path) as z:
            return cls.from_arrays(z)

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The arrays ``save`` writes, their names prefixed (several matchings in one file)."""
        arrays = {f"{prefix}image_ids": np.asarray(self.image_ids, np.int64),
                  f"{prefix}category_ids": np.asarray(self.category_ids, np.int64),
                  f"{prefix}gt_digest": np.asarray(self.gt_digest)}
        for a, m in enumerate(self.areas):
            if m is None:
                continue
            for name in ("category", "image", "score", "num_gt"):
                arrays[f"{prefix}{AREA_NAMES[a]}_{name}"] = getattr(m, name)
            for name in ("tp", "ignored"):
                arrays[f"{prefix}{AREA_NAMES[a]}_{name}"] = np.packbits(getattr(m, name), axis=1)
        return arrays

    @classmethod
    def from_arrays(cls, z, prefix: str = "") -> "Matches":
        """The inverse of :meth:`arrays` (``z``: a mapping such as an open ``np.load``)."""
        areas: list[AreaMatches | None] = []
        for name in AREA_NAMES:
            key = f"{prefix}{name}"
            if f"{key}_score" not in z:
                areas.append(None)
                continue
            n = len(z[f"{key}_score"])
            bits = {k: np.unpackbits(z[f"{key}_{k}"], axis=1, count=n).astype(bool) for k in ("tp", "ignored")}
            areas.append(AreaMatches(z[f"{key}_category"], z[f"{key}_image"], z[f"{key}_score"],
                                     bits["tp"], bits["ignored"], z[f"{key}_num_gt"]))
        return cls(z[f"{prefix}image_ids"].tolist(), z[f"{prefix}category_ids"].tolist(), areas,
                   str(z[f"{prefix}gt_digest"]))


def gt_digest(dataset: dict) -> str:
    """A digest of what the evaluation depends on: image ids and the annotations' image,
    category, box, area and crowd flag (not ``ignore``: COCOeval overwrites it with the flag)."""
    import hashlib
    import json

    anns = sorted((a["image_id"], a["category_id"], [round(float(v), 2) for v in a["bbox"]],
                   round(float(a.get("area", 0.0)), 1), int(a.get("iscrowd", 0)))
                  for a in dataset.get("annotations", []))
    images = sorted(img["id"] for img in dataset.get("images", []))
    return hashlib.sha1(json.dumps([images, anns]).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------
def _fast_backend():
    try:
        from faster_coco_eval import COCO as FastCOCO
        from faster_coco_eval.core.faster_eval_api import COCOeval_faster
    except ImportError:
        return None
    return FastCOCO, COCOeval_faster


def _quiet(*args, **kwargs) -> None:
    return None


def _fast_eval(dataset: dict, detections: list[dict], area_indices, separate: bool):
    FastCOCO, COCOeval_faster = _fast_backend()
    gt = FastCOCO(dataset, print_function=_quiet)
    # Fresh dicts: loadRes writes into them. A "segmentation" key (unused by box IoU) spares
    # loadRes building a polygon per detection, its slowest step.
    results = [{"image_id": d["image_id"], "category_id": d["category_id"], "bbox": d["bbox"],
                "score": d["score"], "segmentation": None} for d in detections]
    ev = COCOeval_faster(gt, gt.loadRes(results), "bbox", separate_eval=separate, print_function=_quiet)
    ev.params.areaRng = [list(AREA_RANGES[a]) for a in area_indices]
    ev.params.areaRngLbl = [AREA_NAMES[a] for a in area_indices]
    ev.evaluate()
    return ev


def _per_image_fast(dataset: dict, detections: list[dict], area_indices):
    """pycocotools' ``evalImgs`` as tuples (dtMatches [T*D], dtScores [D], gtIgnore [G],
    dtIgnore [T*D]) or None, in its order (category, area, image): faster-coco-eval's C++
    ``ImageEvaluation`` pickles to them."""
    ev = _fast_eval(dataset, detections, area_indices, separate=True)
    p = ev.params
    unmatched = _without_ground_truth(dataset, detections, p, area_indices)
    out = []
    for n, e in enumerate(ev._evalImgs_cpp):
        if n in unmatched:   # reading the C++ result costs more than knowing it
            out.append(unmatched[n])
            continue
        s = e.__getstate__()
        if len(s) < 5:
            raise RuntimeError("faster-coco-eval's per-image results changed format; use backend='pycocotools'")
        out.append((s[0], s[2], s[3], s[4]) if s[2] or s[3] else None)
    return out, p


def _without_ground_truth(dataset: dict, detections: list[dict], params, area_indices) -> dict:
    """The ``evalImgs`` entries of (image, category) pairs that have detections but no ground
    truth, built directly: every detection unmatched, ignored where its area is outside the
    range; the top 100 by score. Keyed by the entry's index."""
    T, num_images, num_areas = len(IOU_THRESHOLDS), len(params.imgIds), len(area_indices)
    with_gt = {(a["image_id"], a["category_id"]) for a in dataset.get("annotations", [])}
    groups: dict[tuple, list] = {}
    for d in detections:
        key = (d["image_id"], d["category_id"])
        if key not in with_gt:
            groups.setdefault(key, []).append((d["score"], d["bbox"][2] * d["bbox"][3]))
    img_index = {i: n for n, i in enumerate(params.imgIds)}
    cat_index = {c: n for n, c in enumerate(params.catIds)}
    out = {}
    max_det = params.maxDets[-1]
    for (image_id, cat_id), dets in groups.items():
        dets = sorted(dets, key=lambda sa: -sa[0])[:max_det]
        scores = [s for s, _ in dets]
        zeros = [0] * (T * len(dets))
        base = cat_index[cat_id] * num_areas * num_images + img_index[image_id]
        for j, a in enumerate(area_indices):
            lo, hi = AREA_RANGES[a]
            ignore = [area < lo or area > hi for _, area in dets] * T   # [T, D] row-major
            out[base + j * num_images] = (zeros, scores, [], ignore)
    return out


def _per_image_pycocotools(dataset: dict, detections: list[dict], area_indices):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
        ev.params.areaRng = [list(AREA_RANGES[a]) for a in area_indices]
        ev.params.areaRngLbl = [AREA_NAMES[a] for a in area_indices]
        ev.evaluate()
    return _evalimgs_tuples(ev), ev.params


def _evalimgs_tuples(ev) -> list:
    """pycocotools' ``evalImgs`` as (dtMatches [T*D], dtScores [D], gtIgnore [G], dtIgnore [T*D])
    or None, in its order (category, area, image)."""
    return [None if e is None else (e["dtMatches"].ravel(), e["dtScores"], e["gtIgnore"], e["dtIgnore"].ravel())
            for e in ev.evalImgs]


def matches_from_cocoeval(ev, dataset: dict) -> Matches:
    """The :class:`Matches` of a pycocotools COCOeval that was run (``evaluate()``) with one area
    range, "all", and any IoU thresholds ``ev.params.iouThrs`` (T of them: the arrays' first
    axis). For matchings under other settings than :func:`match`'s (error analysis' relaxed
    thresholds and ignored ground truth), so that :class:`Accumulator` can resample them."""
    p = ev.params
    if len(p.areaRng) != 1 or list(p.areaRng[0]) != list(AREA_RANGES[0]):
        raise ValueError("matches_from_cocoeval: the COCOeval must use the single area range 'all'")
    out = Matches(list(p.imgIds), list(p.catIds), [None] * len(AREA_RANGES), gt_digest(dataset))
    out.areas[0] = _area_matches(_evalimgs_tuples(ev), 0, 1, len(p.imgIds), len(p.catIds), len(p.iouThrs))
    return out


def _dataset_dict(coco_gt) -> dict:
    return coco_gt.dataset if hasattr(coco_gt, "dataset") else coco_gt


def _use_fast(backend: str) -> bool:
    if backend == "pycocotools":
        return False
    if _fast_backend() is None:
        if backend == "fast":
            raise RuntimeError("faster-coco-eval is not installed")
        return False
    return True


def match(coco_gt, detections: list[dict], areas=("all",), backend: str = "auto") -> Matches:
    """Match COCO-format ``detections`` to ``coco_gt`` (a pycocotools COCO or its dataset dict)
    for the named area ranges (AREA_NAMES; the others stay None).

    ``backend``: "auto" (faster-coco-eval if installed, else pycocotools), "fast", "pycocotools".
    """
    dataset = _dataset_dict(coco_gt)
    area_indices = [AREA_NAMES.index(a) for a in areas]
    image_ids = sorted({img["id"] for img in dataset.get("images", [])})
    category_ids = sorted({c["id"] for c in dataset.get("categories", [])})
    out = Matches(image_ids, category_ids, [None] * len(AREA_RANGES), gt_digest(dataset))
    if not detections:  # pycocotools cannot load an empty result list
        for a in area_indices:
            out.areas[a] = _no_detections(dataset, image_ids, category_ids, AREA_RANGES[a])
        return out
    run = _per_image_fast if _use_fast(backend) else _per_image_pycocotools
    per_image, params = run(dataset, detections, area_indices)
    if list(params.imgIds) != image_ids or list(params.catIds) != category_ids:
        raise RuntimeError("COCOeval's image or category ids differ from the dataset's")
    for j, a in enumerate(area_indices):
        out.areas[a] = _area_matches(per_image, j, len(area_indices), len(image_ids), len(category_ids))
    return out


def matches_without_detections(dataset: dict, num_thresholds: int = len(IOU_THRESHOLDS)) -> Matches:
    """The :class:`Matches` of no detections at ``num_thresholds`` IoU thresholds, area "all"
    (pycocotools cannot load an empty result list; every AP is 0 where there is ground truth)."""
    image_ids = sorted({img["id"] for img in dataset.get("images", [])})
    category_ids = sorted({c["id"] for c in dataset.get("categories", [])})
    out = Matches(image_ids, category_ids, [None] * len(AREA_RANGES), gt_digest(dataset))
    out.areas[0] = _no_detections(dataset, image_ids, category_ids, AREA_RANGES[0], num_thresholds)
    return out


def _no_detections(dataset: dict, image_ids: list[int], category_ids: list[int], area_range,
                   T: int = len(IOU_THRESHOLDS)) -> AreaMatches:
    """No detections: only the ground-truth counts matter (every AP is 0 where there is GT)."""
    img_index = {i: n for n, i in enumerate(image_ids)}
    cat_index = {c: n for n, c in enumerate(category_ids)}
    lo, hi = area_range
    num_gt = np.zeros((len(image_ids), len(category_ids)), dtype=np.int64)
    for ann in dataset.get("annotations", []):
        if not (ann.get("ignore", 0) or ann.get("iscrowd", 0) or not lo <= ann["area"] <= hi):
            num_gt[img_index[ann["image_id"]], cat_index[ann["category_id"]]] += 1
    return AreaMatches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0),
                       np.zeros((T, 0), bool), np.zeros((T, 0), bool), num_gt)


def _area_matches(per_image, a: int, num_areas: int, num_images: int, num_k: int,
                  T: int = len(IOU_THRESHOLDS)) -> AreaMatches:
    """Flatten the per-image results of the ``a``-th evaluated area range (``T`` IoU thresholds)
    into accumulation order (one pass over Python lists, then numpy)."""
    entries = [(k, i, per_image[k * num_areas * num_images + a * num_images + i])
               for k in range(num_k) for i in range(num_images)]
    entries = [(k, i, e) for k, i, e in entries if e is not None]
    num_gt = np.zeros((num_images, num_k), dtype=np.int64)
    if entries:
        ks = np.array([k for k, _, _ in entries], dtype=np.int64)
        is_ = np.array([i for _, i, _ in entries], dtype=np.int64)
        num_gt[is_, ks] = [len(e[2]) - int(sum(e[2])) for _, _, e in entries]
        d = np.array([len(e[1]) for _, _, e in entries], dtype=np.int64)
    else:
        d = np.zeros(0, np.int64)
    n = int(d.sum())
    if n == 0:
        return AreaMatches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0),
                           np.zeros((T, 0), bool), np.zeros((T, 0), bool), num_gt)
    with_dets = [e for _, _, e in entries if len(e[1])]
    score = np.fromiter(chain.from_iterable(e[1] for e in with_dets), dtype=np.float64, count=n)
    flat_match = np.fromiter(chain.from_iterable(e[0] for e in with_dets), dtype=np.float64, count=T * n)
    flat_ign = np.fromiter(chain.from_iterable(e[3] for e in with_dets), dtype=bool, count=T * n)
    image, category = np.repeat(is_, d), np.repeat(ks, d)
    # det j of an entry with D dets at flat offset o sits at o + t * D + j for threshold t
    d_of = np.repeat(d, d)
    entry_start = np.repeat(np.cumsum(d) - d, d)
    local = np.arange(n) - entry_start
    idx = (T * entry_start + local)[None, :] + np.arange(T)[:, None] * d_of[None, :]
    order = np.lexsort((-score, category))   # stable: ties keep image order (COCOeval's mergesort)
    idx = idx[:, order]
    ignored = flat_ign[idx]
    return AreaMatches(category[order], image[order], score[order], (flat_match[idx] != 0) & ~ignored,
                       ignored, num_gt)


# --------------------------------------------------------------------------------------------
# Weighted accumulation
# --------------------------------------------------------------------------------------------
class _CumAt:
    """Weighted running count of a subset S of the N detections, read at given positions and
    restarting at each category: ``at(w_det)[:, j]`` = sum of ``w_det`` over the members of S
    from the start of point j's category up to position ``positions[j]``. The index work is done
    once; each call is a gather, a cumsum and two gathers. ``subset=None`` means all N (the
    caller passes the shared cumsum)."""

    def __init__(self, subset: np.ndarray | None, positions: np.ndarray, category_start: np.ndarray):
        self.subset = subset
        if subset is None:
            self.read, self.base = positions + 1, category_start
        else:
            self.read = np.searchsorted(subset, positions, side="right")
            self.base = np.searchsorted(subset, category_start, side="left")

    def at(self, w_det: np.ndarray, cum_all: np.ndarray) -> np.ndarray:
        """w_det: [B, N] -> [B, P]; ``cum_all`` [B, N+1]: the cumsum of w_det with a leading 0."""
        if self.subset is None:
            c = cum_all
        else:
            c = np.zeros((w_det.shape[0], len(self.subset) + 1), dtype=np.int64)
            np.cumsum(w_det[:, self.subset], axis=1, out=c[:, 1:])
        return c[:, self.read] - c[:, self.base]


def thresholds_reached(recall: np.ndarray) -> np.ndarray:
    """How many of RECALL_THRESHOLDS are <= each recall (``searchsorted(..., side="right")``),
    computed as floor(100 r) and corrected against the exact linspace values."""
    j = np.clip(np.floor(recall * 100).astype(np.int64), 0, 100)
    count = j + (RECALL_THRESHOLDS[j] <= recall)
    nxt = np.minimum(j + 1, 100)
    return count + ((j < 100) & (RECALL_THRESHOLDS[nxt] <= recall))


class _ThresholdCurve:
    """One (area, IoU threshold): the true positives as curve points, with their counters."""

    def __init__(self, m: AreaMatches, t: int, num_k: int):
        n = len(m.score)
        starts = np.searchsorted(m.category, np.arange(num_k), side="left")
        self.points = np.flatnonzero(m.tp[t])                       # [P] positions in N
        self.category = m.category[self.points]                     # [P]
        self.num_k = num_k
        pstart = starts[self.category]
        self.tp = _CumAt(self.points, self.points, pstart)
        ignored = np.flatnonzero(m.ignored[t])
        self.minus = None
        if len(ignored) <= n // 2:   # scored detections = all minus the ignored ones
            self.scored = _CumAt(None, self.points, pstart)
            if len(ignored):
                self.minus = _CumAt(ignored, self.points, pstart)
        else:
            self.scored = _CumAt(np.flatnonzero(~m.ignored[t]), self.points, pstart)
        self.needs_cum_all = self.scored.subset is None
        # reverse running maximum per category: an offset keeps the categories apart
        self.offset = 2.0 * (num_k - 1 - self.category)
        self.first = np.r_[True, self.category[1:] != self.category[:-1]] if len(self.points) else \
            np.zeros(0, bool)
        self.present, self.seg_start = np.unique(self.category, return_index=True)

    def ap_per_category(self, w_det: np.ndarray, cum_all, num_gt: np.ndarray) -> np.ndarray:
        """w_det: [B, N], num_gt: [B, K] weighted GT counts -> [B, K] AP (NaN where no GT)."""
        B = w_det.shape[0]
        sums = np.zeros((B, self.num_k))
        if len(self.points):
            tp = self.tp.at(w_det, cum_all).astype(np.float64)
            scored = self.scored.at(w_det, cum_all)
            if self.minus is not None:
                scored = scored - self.minus.at(w_det, cum_all)
            precision = tp / (scored + np.spacing(1))
            gt = num_gt[:, self.category].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                recall = np.where(gt > 0, tp / gt, 0.0)
            env = np.maximum.accumulate((precision + self.offset)[:, ::-1], axis=1)[:, ::-1] - self.offset
            reached = thresholds_reached(recall)
            prev = np.zeros_like(reached)
            prev[:, 1:] = reached[:, :-1]
            prev[:, self.first] = 0
            sums[:, self.present] = np.add.reduceat(env * (reached - prev), self.seg_start, axis=1)
        return np.where(num_gt > 0, sums / len(RECALL_THRESHOLDS), np.nan)


def _compress(m: AreaMatches):
    """Merge each run of plain detections (never a true positive, never ignored, at any
    threshold) into one slot: only their summed weight matters, since a false positive is never
    a curve point (see the module docstring). Returns the slots as an :class:`AreaMatches`
    (``image`` unused) and the sparse [S, I] count matrix of images per slot."""
    from scipy.sparse import csr_matrix

    n = len(m.score)
    special = m.tp.any(axis=0) | m.ignored.any(axis=0)
    new_slot = np.ones(n, dtype=bool)
    if n:
        same_cat = np.r_[False, m.category[1:] == m.category[:-1]]
        new_slot = special | ~same_cat | np.r_[True, special[:-1]]
    slot = np.cumsum(new_slot) - 1
    num_slots = int(slot[-1]) + 1 if n else 0
    first = np.flatnonzero(new_slot)
    slots = AreaMatches(m.category[first], np.zeros(num_slots, np.int64), m.score[first],
                        m.tp[:, first], m.ignored[:, first], m.num_gt)
    per_slot = csr_matrix((np.ones(n, dtype=np.int64), (slot, m.image)),
                          shape=(num_slots, m.num_gt.shape[0]))
    per_slot.sum_duplicates()
    return slots, per_slot


class Accumulator:
    """COCO metrics of :class:`Matches` under image weights (all ones = pycocotools' numbers).

    ``metrics``: which of METRIC_KEYS to compute (only the area ranges they need are prepared);
    default: all those whose area range ``matches`` has.
    """

    def __init__(self, matches: Matches, metrics=None):
        if metrics is None:  # every metric whose area range was matched
            metrics = [k for k in METRIC_KEYS if matches.areas[AREA_OF_METRIC.get(k, 0)] is not None]
        self.metrics = tuple(metrics)
        thresholds = {m.tp.shape[0] for m in matches.areas if m is not None}
        if thresholds != {len(IOU_THRESHOLDS)} and set(self.metrics) & set(THRESHOLD_OF_METRIC):
            raise ValueError("AP50 ... AP90 need a matching at COCO's ten IoU thresholds "
                             "(use threshold_ap for others)")
        self.num_images = len(matches.image_ids)
        num_k = len(matches.category_ids)
        self.areas = {}
        for a in areas_needed(self.metrics):
            m = matches.areas[a]
            if m is None:
                raise ValueError(f"{AREA_NAMES[a]!r} area range was not matched (match(..., areas=...))")
            slots, per_slot = _compress(m)
            curves = [_ThresholdCurve(slots, t, num_k) for t in range(slots.tp.shape[0])]
            self.areas[a] = (slots, per_slot, m.num_gt.astype(np.float64), curves)

    def __call__(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """weights: [B, I] non-negative integers (None: one vector of ones) -> {metric: [B]} in
        percent; a metric without any ground truth (COCOeval's -1) is 0."""
        per_area = {a: self.category_ap(weights, a) for a in self.areas}
        out = {}
        for key in self.metrics:
            ap = per_area[AREA_OF_METRIC.get(key, 0)]
            if key in THRESHOLD_OF_METRIC:
                ap = ap[:, THRESHOLD_OF_METRIC[key]:THRESHOLD_OF_METRIC[key] + 1]
            out[key] = mean_valid(ap)
        return out

    def category_ap(self, weights: np.ndarray | None = None, area: int = 0) -> np.ndarray:
        """weights: [B, I] (None: ones) -> [B, T, K] AP (fraction) per threshold and category of
        the area range ``area`` (an index of AREA_NAMES), NaN where a category has no ground truth."""
        if weights is None:
            weights = np.ones((1, self.num_images), dtype=np.int64)
        weights = np.asarray(weights, dtype=np.int64)
        m, per_slot, gt_counts, curves = self.areas[area]
        w_det = np.ascontiguousarray((per_slot @ weights.T).T)        # [B, S] exact integers
        num_gt = np.rint(weights.astype(np.float64) @ gt_counts)      # [B, K] (BLAS)
        cum_all = None
        if any(c.needs_cum_all for c in curves):
            cum_all = np.zeros((w_det.shape[0], w_det.shape[1] + 1), dtype=np.int64)
            np.cumsum(w_det, axis=1, out=cum_all[:, 1:])
        return np.stack([c.ap_per_category(w_det, cum_all, num_gt) for c in curves], axis=1)

    def threshold_ap(self, weights: np.ndarray | None = None) -> np.ndarray:
        """weights: [B, I] -> [B, T] AP in percent at each IoU threshold the matching has (area
        "all"; the mean over categories with ground truth, 0 without any)."""
        ap = self.category_ap(weights, 0)
        return np.stack([mean_valid(ap[:, t:t + 1]) for t in range(ap.shape[1])], axis=1)


def mean_valid(ap: np.ndarray) -> np.ndarray:
    """[B, T, K] with NaN for categories without GT -> [B] mean over the rest, in percent (0 if none)."""
    valid = ~np.isnan(ap)
    count = valid.sum(axis=(1, 2))
    total = np.where(valid, ap, 0.0).sum(axis=(1, 2))
    return np.where(count > 0, 100.0 * total / np.maximum(count, 1), 0.0)


def evaluate(coco_gt, detections: list[dict], backend: str = "auto") -> dict[str, float]:
    """All METRIC_KEYS in percent, equal to pycocotools' COCOeval (-1, no ground truth in an area
    range: 0). "auto"/"fast": faster-coco-eval's C++ evaluate + accumulate; "pycocotools": the
    reference; "ours": our matching arrays + :class:`Accumulator` (what the bootstrap runs)."""
    return evaluate_with_precision(coco_gt, detections, backend)[0]


def evaluate_with_precision(coco_gt, detections: list[dict], backend: str = "auto"
                            ) -> tuple[dict[str, float], np.ndarray | None]:
    """:func:`evaluate` and COCOeval's ``eval["precision"]`` [T, R, K, A, M] it read them from
    (None for backend "ours" and for no detections), for callers that need more than the metrics."""
    dataset = _dataset_dict(coco_gt)
    if backend == "ours" or not detections:
        values = Accumulator(match(dataset, detections, AREA_NAMES))()
        return {k: float(v[0]) for k, v in values.items()}, None
    precision = np.asarray(accumulated_eval(dataset, detections, backend).eval["precision"])
    return metrics_from_precision(precision), precision


def accumulated_eval(coco_gt, detections: list[dict], backend: str = "auto"):
    """COCOeval (bbox, default params) of non-empty ``detections``, evaluated and accumulated:
    faster-coco-eval's ("auto" when installed, "fast") or pycocotools' ("pycocotools"). Its
    ``eval["precision"]`` is [T, R, K, A, M] (categories in sorted id order)."""
    dataset = _dataset_dict(coco_gt)
    if _use_fast(backend):
        ev = _fast_eval(dataset, detections, range(len(AREA_RANGES)), separate=False)
        ev.accumulate()
        return ev
    return pycocotools_eval(dataset, detections)


def pycocotools_eval(dataset: dict, detections: list[dict]):
    """pycocotools' COCOeval (bbox) of ``detections`` against the COCO ``dataset`` dict, evaluated
    and accumulated, its printing silenced: the reference the tests and ``bench eval`` compare to."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
        ev.evaluate()
        ev.accumulate()
    return ev


def metrics_from_precision(precision: np.ndarray) -> dict[str, float]:
    """COCOeval's ``eval["precision"]`` [T, R, K, A, M] (default params) -> METRIC_KEYS in percent:
    the mean over entries > -1 (COCOeval.summarize's rule) at area "all" (or the metric's area),
    maxDets 100; no such entry (no ground truth) -> 0."""
    out = {}
    for key in METRIC_KEYS:
        p = precision[:, :, :, AREA_OF_METRIC.get(key, 0), -1]
        if key in THRESHOLD_OF_METRIC:
            p = p[THRESHOLD_OF_METRIC[key]]
        p = p[p > -1]
        out[key] = 100.0 * float(p.mean()) if p.size else 0.0
    return out
