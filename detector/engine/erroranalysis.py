"""Where the AP goes: per-class AP, COCO's error analysis, TIDE-style error attribution and
precision-recall curves of one evaluation.

What comes from where (and why some of it is written here):

* **per-class AP / AP75 and the PR curves** are read from COCOeval's ``eval["precision"]``
  (faster-coco-eval's when installed, else pycocotools': :func:`cocoeval.accumulated_eval`).
* **COCO's error analysis** (``analyze()`` of the COCO API, mmdetection's
  ``coco_error_analysis.py``): pycocotools' COCOeval re-run with relaxed settings: C75, C50, Loc
  (IoU .1), Sim (confusion with a category of the same supercategory removed), Oth (confusion
  with any other category removed), BG (every remaining false positive removed), FN (every
  missed object found). Neither library ships it; mmdetection's script marks the confusable
  ground truth with an ``ignored_split`` key that pycocotools never reads (its ``_prepare``
  overwrites ``ignore`` with ``iscrowd``), so those boxes count as extra ground truth there.
  :class:`_IgnoringCOCOeval` makes pycocotools honour the flag, as the MATLAB original did.
* **TIDE-style attribution** (Bolya et al., ECCV 2020): each false positive of the IoU-.5
  matching gets one type (cls, loc, both, dupe, bkg), each unmatched object that no error
  claims is ``miss``, and ΔAP50 is the AP50 gained when the errors of one type are fixed.
  ``tidecv`` (1.0.1, 2020) cannot be used: it imports OpenCV (not a dependency here) to load
  data, and re-implements COCO matching; here the matching is pycocotools' own (``evalImgs``
  at IoU .5) and ΔAP is COCOeval re-run on the fixed detections.

All AP values are in percent, at area "all" and 100 detections per image and category, averaged
over the categories that have ground truth (COCOeval's -1 entries are left out, as in
``summarize``; mmdetection's script counts a category without ground truth as 0).

Glossary:
    K  categories (sorted ids)      R  recall thresholds (101: 0, .01, ..., 1)
    D  detections (input order)     G  ground-truth boxes of one image
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ioulab.detector.engine import cocoeval

CURVE_IOUS = (0.5, 0.75, 0.9)               # the PR curves drawn and stored
COCO_STEPS = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
TIDE_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
FG_IOU, BG_IOU = 0.5, 0.1                   # TIDE's foreground and background thresholds
LOC_IOU = 0.1                               # COCO analysis' Loc, Sim and Oth
STRICT_IOUS = (0.75, 0.5, LOC_IOU)          # C75, C50, Loc: one COCOeval run
METRIC_PREFIX = "err/"                      # platform/mlflow_names.py: ERROR_PREFIX (same string)
ERRORS_FILE, CURVES_FILE, MATCHES_FILE = "errors.json", "pr_curves.png", "error_matches.npz"
# The scalars an evaluation logs (:meth:`ErrorAnalysis.metrics`), in this order.
METRIC_NAMES = (tuple(f"{METRIC_PREFIX}{k}" for k in TIDE_TYPES) + tuple(f"{METRIC_PREFIX}n_{k}" for k in TIDE_TYPES)
                + tuple(f"{METRIC_PREFIX}coco_{k.lower()}" for k in COCO_STEPS))


@dataclass
class ErrorAnalysis:
    """One evaluation's breakdown (what ``errors.json`` holds).

    ``class_ap`` / ``class_ap75``: {category name: AP} (percent; None without ground truth);
    ``coco``: COCO_STEPS -> AP; ``tide_delta``: TIDE_TYPES -> ΔAP50 if that type were fixed;
    ``tide_count``: TIDE_TYPES -> how many detections (objects, for miss) it has;
    ``recall`` [R] and ``precision``: {"0.5" | "0.75" | "0.9": [R] mean over categories}.
    """

    class_ap: dict[str, float | None]
    class_ap75: dict[str, float | None]
    coco: dict[str, float]
    tide_delta: dict[str, float]
    tide_count: dict[str, int]
    base_ap50: float
    recall: list[float] = field(default_factory=lambda: cocoeval.RECALL_THRESHOLDS.tolist())
    precision: dict[str, list[float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The scalars an evaluation logs: ``err/<tide type>`` (ΔAP50), ``err/n_<tide type>``
        (counts) and ``err/coco_<step>`` (AP of each COCO analysis step, lower-case)."""
        values = [self.tide_delta[k] for k in TIDE_TYPES] + [float(self.tide_count[k]) for k in TIDE_TYPES]
        return dict(zip(METRIC_NAMES, values + [self.coco[k] for k in COCO_STEPS]))

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "ErrorAnalysis":
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def from_json(cls, data: dict) -> "ErrorAnalysis":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def summary(self) -> str:
        """Two lines for a terminal: the COCO analysis and the TIDE ΔAP50 (counts in brackets)."""
        coco = "  ".join(f"{k} {v:.1f}" for k, v in self.coco.items())
        tide = "  ".join(f"{k} {self.tide_delta[k]:+.1f} [{self.tide_count[k]}]" for k in TIDE_TYPES)
        return f"COCO error analysis (AP): {coco}\nΔAP50 if fixed [count]:   {tide}"


def analyze(coco_gt, detections: list[dict], precision: np.ndarray | None = None) -> ErrorAnalysis:
    """The full breakdown of COCO-format ``detections`` against ``coco_gt`` (a COCO or its
    dataset dict). ``precision``: COCOeval's ``eval["precision"]`` [T, R, K, A, M] of these
    detections at the default settings, when the caller has it (else it is computed)."""
    return analyze_and_match(coco_gt, detections, precision)[0]


def analyze_and_match(coco_gt, detections: list[dict], precision: np.ndarray | None = None
                      ) -> tuple[ErrorAnalysis, ErrorMatches | None]:
    """:func:`analyze` and the per-image matchings behind it (:class:`ErrorMatches`, what the
    report resamples for its intervals; None without detections)."""
    dataset = copy.deepcopy(cocoeval._dataset_dict(coco_gt))
    cats = sorted(dataset.get("categories", []), key=lambda c: c["id"])
    names = [str(c.get("name", c["id"])) for c in cats]
    detections = [dict(d, id=n + 1) for n, d in enumerate(detections)]
    if not detections:
        return _without_detections(dataset, names), None
    if precision is None:
        precision = cocoeval.accumulated_eval(dataset, detections).eval["precision"]
    precision = np.asarray(precision)[:, :, :, 0, -1]
    ap = _class_ap(precision)
    strict = _evaluate(dataset, detections, list(STRICT_IOUS))
    confusion = {name: _evaluate(_confusion_ignored(dataset, detections, same), detections, [LOC_IOU])
                 for name, same in _confusions(dataset).items()}
    coco = _coco_steps(strict, confusion["sim"], confusion["oth"])
    tide = _tide(dataset, detections, strict)
    curves = {f"{t:g}": _mean_curve(precision[int(round((t - 0.5) / 0.05))]) for t in CURVE_IOUS}
    analysis = ErrorAnalysis(class_ap=_named(names, ap.mean(axis=0)), class_ap75=_named(names, ap[5]),
                             coco=coco, tide_delta=tide.delta, tide_count=tide.count, base_ap50=tide.base,
                             precision=curves)
    as_matches = functools.partial(cocoeval.matches_from_cocoeval, dataset=dataset)
    matches = ErrorMatches(strict=as_matches(strict), sim=as_matches(confusion["sim"]),
                           oth=as_matches(confusion["oth"]), fixed=tide.fixed, counts=tide.per_image)
    return analysis, matches


# --------------------------------------------------------------------------------------------
# per class and curves
# --------------------------------------------------------------------------------------------
def _class_ap(precision: np.ndarray) -> np.ndarray:
    """precision [T, R, K] (-1: no ground truth) -> [T, K] AP in percent, NaN without ground truth."""
    valid = (precision > -1).all(axis=1)
    return np.where(valid, 100.0 * np.clip(precision, 0, None).mean(axis=1), np.nan)


def _named(names: list[str], values: np.ndarray) -> dict[str, float | None]:
    """[K] -> {name: value rounded, None for NaN} (JSON has no NaN)."""
    return {n: None if np.isnan(v) else round(float(v), 4) for n, v in zip(names, values)}


def _mean_curve(precision: np.ndarray) -> list[float]:
    """[R, K] -> [R] mean precision over the categories with ground truth."""
    valid = (precision > -1).all(axis=0)
    if not valid.any():
        return [0.0] * precision.shape[0]
    return precision[:, valid].mean(axis=1).round(5).tolist()


# --------------------------------------------------------------------------------------------
# COCOeval with relaxed settings
# --------------------------------------------------------------------------------------------
@functools.cache
def _ignoring_cocoeval():
    """A pycocotools COCOeval subclass whose ground truth honours ``ignored_split`` (such a box
    is ignored: a detection on it is neither a true nor a false positive). Built on first use:
    pycocotools is imported lazily like everywhere in the engine."""
    from pycocotools.cocoeval import COCOeval

    class IgnoringCOCOeval(COCOeval):
        def _prepare(self):
            super()._prepare()
            for gts in self._gts.values():
                for g in gts:
                    if g.get("ignored_split"):
                        g["ignore"] = 1

    return IgnoringCOCOeval


def _evaluate(dataset: dict, detections: list[dict], ious: list[float]):
    """pycocotools COCOeval at IoU thresholds ``ious``, 100 detections, area "all": evaluated
    and accumulated (``eval["precision"]`` [T, R, K, 1, 1], ``evalImgs`` kept)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        ev = _ignoring_cocoeval()(gt, gt.loadRes([dict(d) for d in detections]), "bbox")
        ev.params.iouThrs = np.asarray(ious, dtype=np.float64)
        ev.params.maxDets = [100]
        ev.params.areaRng, ev.params.areaRngLbl = [list(cocoeval.AREA_RANGES[0])], ["all"]
        ev.evaluate()
        ev.accumulate()
    return ev


def _confusion_ignored(dataset: dict, detections: list[dict], same_group) -> dict:
    """A copy of ``dataset`` where every ground-truth box of category c also appears, ignored,
    as category k, for each k != c with ``same_group(c, k)`` that has detections in its image:
    a category-k detection on it is then no false positive (COCO analysis' Sim and Oth)."""
    detected: dict[int, set[int]] = {}
    for d in detections:
        detected.setdefault(d["image_id"], set()).add(d["category_id"])
    out = dict(dataset, annotations=list(dataset.get("annotations", [])))
    next_id = max((a["id"] for a in out["annotations"]), default=0) + 1
    for a in dataset.get("annotations", []):
        if a.get("iscrowd", 0):
            continue
        for k in sorted(detected.get(a["image_id"], ())):
            if k != a["category_id"] and same_group(a["category_id"], k):
                out["annotations"].append(dict(a, id=next_id, category_id=k, ignored_split=1))
                next_id += 1
    return out


def _step_ap(precision: np.ndarray, valid: np.ndarray) -> float:
    """[R, K] (-1 -> 0) -> mean over the ``valid`` categories, in percent."""
    if not valid.any():
        return 0.0
    return 100.0 * float(np.clip(precision[:, valid], 0, None).mean())


def _confusions(dataset: dict) -> dict:
    """COCO analysis' Sim and Oth: which (ground-truth category, detected category) pairs are
    forgiven: same supercategory, or any."""
    superc = {c["id"]: c.get("supercategory") for c in dataset.get("categories", [])}
    return {"sim": lambda c, k: superc[c] == superc[k], "oth": lambda c, k: True}


def _coco_steps(strict, sim_ev, oth_ev) -> dict[str, float]:
    """COCO_STEPS -> AP: C75, C50, Loc from ``strict`` (IoU .75, .5, .1), Sim and Oth at IoU .1
    with the confusable ground truth ignored; BG: precision 1 wherever Oth reaches; FN: 1."""
    ps = np.asarray(strict.eval["precision"])[:, :, :, 0, 0]            # [3, R, K]
    valid = (ps[1] > -1).all(axis=0)
    sim = sim_ev.eval["precision"][0, :, :, 0, 0]
    oth = oth_ev.eval["precision"][0, :, :, 0, 0]
    steps = [ps[0], ps[1], ps[2], sim, oth, (oth > 0).astype(np.float64), np.ones_like(oth)]
    return {name: round(_step_ap(p, valid), 4) for name, p in zip(COCO_STEPS, steps)}


# --------------------------------------------------------------------------------------------
# TIDE-style attribution
# --------------------------------------------------------------------------------------------
@dataclass
class _Error:
    kind: str
    det: int                 # index into detections
    gt: int | None = None    # ground-truth id it would become a true positive of (cls, loc)


def _matching_at_fg(strict) -> tuple[set[int], list[int]]:
    """From pycocotools' ``evalImgs`` at IoU .5: the ids of the matched ground truth and of the
    false-positive detections (neither ignored, on a crowd box, nor matched; detections past the
    100-per-image-and-category cut are left out: they cannot move AP)."""
    t = STRICT_IOUS.index(FG_IOU)
    matched, fp = set(), []
    for e in strict.evalImgs:
        if e is None:
            continue
        for d, m, ign in zip(e["dtIds"], e["dtMatches"][t], e["dtIgnore"][t]):
            if m > 0 and not ign:
                matched.add(int(m))
            elif not ign:
                fp.append(d)
    return matched, fp


def _ious(dets: list[dict], gts: list[dict]) -> np.ndarray:
    """[D, G] box IoU (pycocotools' ``iou``; crowd boxes: intersection over the detection)."""
    from pycocotools import mask as mask_utils

    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_utils.iou([d["bbox"] for d in dets], [g["bbox"] for g in gts],
                                     [int(g.get("iscrowd", 0)) for g in gts])).reshape(len(dets), len(gts))


def _classify(det: dict, gts: list[dict], ious: np.ndarray) -> tuple[str, int | None]:
    """TIDE's order for one false positive: loc (same class, bg <= IoU < fg), cls (another class,
    IoU >= fg), dupe (same class, IoU >= fg: its object is taken), bkg (IoU < bg with everything),
    else both. Crowd boxes are left out. Returns (type, target ground-truth id or None)."""
    same = np.array([g["category_id"] == det["category_id"] for g in gts], dtype=bool)
    crowd = np.array([bool(g.get("iscrowd", 0)) for g in gts], dtype=bool)
    iou = np.where(crowd, 0.0, ious)
    same_iou, other_iou = np.where(same, iou, 0.0), np.where(same, 0.0, iou)
    if len(gts) and BG_IOU <= same_iou.max() < FG_IOU:
        return "loc", gts[int(same_iou.argmax())]["id"]
    if len(gts) and other_iou.max() >= FG_IOU:
        return "cls", gts[int(other_iou.argmax())]["id"]
    if len(gts) and same_iou.max() >= FG_IOU:
        return "dupe", None
    if not len(gts) or iou.max() < BG_IOU:
        return "bkg", None
    return "both", None


def _errors(dataset: dict, detections: list[dict], strict) -> tuple[list[_Error], list[int], set[int]]:
    """The false positives with their type, the missed and the matched ground-truth ids."""
    matched, fp = _matching_at_fg(strict)
    gts_of: dict[int, list[dict]] = {}
    for a in dataset.get("annotations", []):
        gts_of.setdefault(a["image_id"], []).append(a)
    by_image: dict[int, list[int]] = {}
    for d in fp:
        by_image.setdefault(detections[d - 1]["image_id"], []).append(d - 1)
    errors = []
    for image_id, idx in by_image.items():
        gts = gts_of.get(image_id, [])
        ious = _ious([detections[i] for i in idx], gts)
        for row, i in enumerate(idx):
            kind, target = _classify(detections[i], gts, ious[row])
            errors.append(_Error(kind, i, target))
    claimed = {e.gt for e in errors if e.gt is not None}
    missed = [a["id"] for a in dataset.get("annotations", [])
              if not a.get("iscrowd", 0) and a["id"] not in matched and a["id"] not in claimed]
    return errors, missed, matched


def _fixed(dataset: dict, detections: list[dict], errors: list[_Error], kind: str, taken: set[int]) -> list[dict]:
    """The detections with the errors of ``kind`` fixed: cls takes its object's class, loc its
    object's box, while that object is free (else, like the other types, it is removed)."""
    gt_by_id = {a["id"]: a for a in dataset.get("annotations", [])}
    mine = sorted((e for e in errors if e.kind == kind), key=lambda e: -detections[e.det]["score"])
    drop, replace, taken = set(), {}, set(taken)
    for e in mine:
        if e.gt is None or e.gt in taken:
            drop.add(e.det)
            continue
        taken.add(e.gt)
        g = gt_by_id[e.gt]
        fix = {"category_id": g["category_id"]} if kind == "cls" else {"bbox": list(g["bbox"])}
        replace[e.det] = dict(detections[e.det], **fix)
    return [replace.get(i, d) for i, d in enumerate(detections) if i not in drop]


def _ap50(ev, t: int = 0) -> float:
    """AP (percent) of a COCOeval run at its ``t``-th IoU threshold, over its categories with ground truth."""
    p = np.asarray(ev.eval["precision"])[t, :, :, 0, 0]
    return _step_ap(p, (p > -1).all(axis=0))


@dataclass
class _Tide:
    base: float                      # AP50
    delta: dict[str, float]          # TIDE_TYPES -> ΔAP50 when fixed
    count: dict[str, int]            # TIDE_TYPES -> how many
    fixed: dict                      # TIDE_TYPES -> Matches at IoU .5 of the fixed detections / ground truth
    per_image: dict[str, np.ndarray]  # TIDE_TYPES -> [I] count per image (sorted image ids)


def _tide(dataset: dict, detections: list[dict], strict) -> _Tide:
    errors, missed, matched = _errors(dataset, detections, strict)
    base = _ap50(strict, STRICT_IOUS.index(FG_IOU))
    image_index = {i: n for n, i in enumerate(sorted(img["id"] for img in dataset.get("images", [])))}
    image_of_gt = {a["id"]: a["image_id"] for a in dataset.get("annotations", [])}
    out = _Tide(round(base, 4), {}, {}, {}, {})
    for kind in TIDE_TYPES:
        if kind == "miss":
            gone = set(missed)
            ap, out.fixed[kind] = _fg_eval(dict(dataset, annotations=[
                a for a in dataset.get("annotations", []) if a["id"] not in gone]), detections)
            images = [image_of_gt[g] for g in missed]
        else:
            ap, out.fixed[kind] = _fg_eval(dataset, _fixed(dataset, detections, errors, kind, matched))
            images = [detections[e.det]["image_id"] for e in errors if e.kind == kind]
        out.per_image[kind] = np.bincount([image_index[i] for i in images], minlength=len(image_index))
        out.count[kind] = len(images)
        out.delta[kind] = round(ap - base, 4) if images else 0.0
    return out


def _fg_eval(dataset: dict, detections: list[dict]) -> tuple[float, cocoeval.Matches]:
    """(AP50, the Matches at IoU .5) of ``detections``; fixing may leave none (every detection was
    an error of the type removed): AP 0, which pycocotools cannot compute (no empty result list)."""
    if not detections:
        return 0.0, cocoeval.matches_without_detections(dataset, 1)
    ev = _evaluate(dataset, detections, [FG_IOU])
    return _ap50(ev), cocoeval.matches_from_cocoeval(ev, dataset)


def _without_detections(dataset: dict, names: list[str]) -> ErrorAnalysis:
    """No detections: every AP is 0 where there is ground truth; every object is missed."""
    with_gt = {a["category_id"] for a in dataset.get("annotations", []) if not a.get("iscrowd", 0)}
    ids = sorted(c["id"] for c in dataset.get("categories", []))
    ap = {n: (0.0 if c in with_gt else None) for n, c in zip(names, ids)}
    misses = sum(1 for a in dataset.get("annotations", []) if not a.get("iscrowd", 0))
    coco = {k: (100.0 if k == "FN" and with_gt else 0.0) for k in COCO_STEPS}
    delta = {k: (100.0 if k == "miss" and with_gt else 0.0) for k in TIDE_TYPES}
    count = {k: (misses if k == "miss" else 0) for k in TIDE_TYPES}
    zeros = [0.0] * len(cocoeval.RECALL_THRESHOLDS)
    return ErrorAnalysis(ap, dict(ap), coco, delta, count, 0.0,
                         precision={f"{t:g}": list(zeros) for t in CURVE_IOUS})


# --------------------------------------------------------------------------------------------
# The breakdown under image resamples (the report's intervals)
# --------------------------------------------------------------------------------------------
@dataclass
class ErrorMatches:
    """The per-image matchings every number of :class:`ErrorAnalysis.metrics` is computed from,
    so that a bootstrap can recompute them for any image weights without matching again (like
    ``eval_matches.npz`` for the AP columns). ``matches_file`` holds it.

    ``strict``: IoU STRICT_IOUS (.75, .5, .1); ``sim`` / ``oth``: IoU .1 with the confusable ground
    truth ignored; ``fixed``: TIDE_TYPES -> IoU .5 of the detections (ground truth, for miss) with
    that type's errors fixed; ``counts``: TIDE_TYPES -> [I] errors per image. One area range
    ("all"), 100 detections; images and categories as in ``strict``.
    """

    strict: cocoeval.Matches
    sim: cocoeval.Matches
    oth: cocoeval.Matches
    fixed: dict[str, cocoeval.Matches]
    counts: dict[str, np.ndarray]

    # what bootstrap.check_same_images compares
    @property
    def image_ids(self) -> list[int]:
        return self.strict.image_ids

    @property
    def category_ids(self) -> list[int]:
        return self.strict.category_ids

    @property
    def gt_digest(self) -> str:
        return self.strict.gt_digest

    def save(self, path) -> None:
        arrays = {**self.strict.arrays("strict/"), **self.sim.arrays("sim/"), **self.oth.arrays("oth/")}
        for kind in TIDE_TYPES:
            arrays.update(self.fixed[kind].arrays(f"fixed_{kind}/"))
            arrays[f"count_{kind}"] = np.asarray(self.counts[kind], np.int64)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path) -> "ErrorMatches":
        with np.load(path) as z:
            load = cocoeval.Matches.from_arrays
            return cls(load(z, "strict/"), load(z, "sim/"), load(z, "oth/"),
                       {k: load(z, f"fixed_{k}/") for k in TIDE_TYPES},
                       {k: z[f"count_{k}"] for k in TIDE_TYPES})


class ErrorAccumulator:
    """:meth:`ErrorAnalysis.metrics` of one run's :class:`ErrorMatches` under image weights:
    ``acc(weights [B, I])`` -> {metric: [B]} (weights of ones: the logged values, to rounding).
    The same interface as :class:`cocoeval.Accumulator`, so ``bootstrap.variant_samples`` takes it.

    Per resample: the COCO steps are AP of the ``strict``, ``sim`` and ``oth`` matchings; BG is
    the number of recall thresholds ``oth`` reaches per category (precision 1 up to its final
    recall); a TIDE ΔAP50 is AP50 of the fixed matching minus AP50; a count is the weighted sum
    of its per-image counts. An error's type and fix depend on its own image only, so weighting
    images is the same as analysing the resampled image set.
    """

    def __init__(self, matches: ErrorMatches, metrics=METRIC_NAMES):
        self.metrics = tuple(metrics)
        unknown = set(self.metrics) - set(METRIC_NAMES)
        if unknown:
            raise ValueError(f"not an error-analysis metric: {sorted(unknown)}")
        ap = functools.partial(cocoeval.Accumulator, metrics=("AP",))
        self.strict, self.sim, self.oth = ap(matches.strict), ap(matches.sim), ap(matches.oth)
        self.fixed = {k: ap(m) for k, m in matches.fixed.items()}
        self.counts = np.stack([np.asarray(matches.counts[k], np.float64) for k in TIDE_TYPES], axis=1)  # [I, 6]
        oth = matches.oth.areas[0]
        self.oth_tp = np.zeros(oth.num_gt.shape)                           # [I, K] true positives
        np.add.at(self.oth_tp, (oth.image[oth.tp[0]], oth.category[oth.tp[0]]), 1.0)
        self.oth_gt = oth.num_gt.astype(np.float64)                        # [I, K]

    def __call__(self, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if weights is None:
            weights = np.ones((1, self.strict.num_images), dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        strict = self.strict.threshold_ap(weights)                         # [B, 3]: C75, C50, Loc
        c50 = strict[:, STRICT_IOUS.index(FG_IOU)]
        gt = w @ self.oth_gt                                               # [B, K]
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = np.where(gt > 0, (w @ self.oth_tp) / gt, 0.0)
        # a category without a true positive has precision 0 everywhere: no threshold counts
        reached = np.where(recall > 0, cocoeval.thresholds_reached(recall), 0)
        bg = np.where(gt > 0, reached / len(cocoeval.RECALL_THRESHOLDS), np.nan)
        steps = [strict[:, 0], strict[:, 1], strict[:, 2], self.sim.threshold_ap(weights)[:, 0],
                 self.oth.threshold_ap(weights)[:, 0], cocoeval.mean_valid(bg[:, None, :]),
                 100.0 * (gt > 0).any(axis=1)]
        counts = w @ self.counts                                           # [B, 6]
        values = [self.fixed[k].threshold_ap(weights)[:, 0] - c50 for k in TIDE_TYPES]
        values += [counts[:, n] for n in range(len(TIDE_TYPES))] + steps
        out = dict(zip(METRIC_NAMES, values))
        return {m: out[m] for m in self.metrics}


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def curves_figure(curves: dict[str, tuple[list[float], list[float]]], title: str):
    """A matplotlib figure of PR curves: {label: (recall [R], precision [R])} (object API, no
    pyplot state: ``Figure.savefig`` renders on the Agg canvas)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.6), dpi=110)
    ax = fig.add_subplot()
    for label, (recall, precision) in curves.items():
        ax.plot(recall, precision, label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def write(out_dir: Path, analysis: ErrorAnalysis, matches: ErrorMatches | None = None) -> None:
    """``errors.json``, ``pr_curves.png`` (the curves at CURVE_IOUS) and, when given,
    ``error_matches.npz`` into ``out_dir``."""
    analysis.save(out_dir / ERRORS_FILE)
    if matches is not None:
        matches.save(out_dir / MATCHES_FILE)
    curves = {f"IoU {k}": (analysis.recall, v) for k, v in analysis.precision.items()}
    fig = curves_figure(curves, "precision-recall (mean over classes)")
    fig.savefig(out_dir / CURVES_FILE)
