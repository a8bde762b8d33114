"""COCO evaluation: run the detector over a dataset, write COCO results, score them like pycocotools.

Metrics are in percent: ``AP`` (IoU .50:.95), ``AP50 AP60 AP70 AP75 AP80 AP90`` (AP at one IoU
threshold, read from COCOeval's precision array — the columns of the papers' tables) and
``APs APm APl``. Every evaluation also measures the model's forward time per image
(``time/infer_ms_per_image``, :func:`predict`): the cost side of the results table.
"""
from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ioulab.detector.engine import cocoeval, erroranalysis
from ioulab.detector.engine.timing import INFER_MS_PER_IMAGE, ForwardTime, timed  # noqa: F401  (re-exported)
from ioulab.detector.engine.cocoeval import METRIC_KEYS  # noqa: F401  (re-exported)

# What an evaluation with ``out_dir`` writes and a tracked run logs: the metrics, the detections
# (gzip) and the per-image matching (``cocoeval.Matches``), so that two runs on the same
# validation set can be compared image by image later (``ioulab compare``, ``ioulab report``);
# where the AP goes (``erroranalysis``: per-class AP, error breakdowns, PR curves and their PNG).
# ``error_matches.npz`` (the error analysis' per-image matchings, for the report's intervals) is
# written only when there are detections: :func:`artifact_paths` leaves it out otherwise.
EVAL_ARTIFACTS = ("metrics.json", "detections.json.gz", "eval_matches.npz",
                  erroranalysis.ERRORS_FILE, erroranalysis.CURVES_FILE, erroranalysis.MATCHES_FILE)


def artifact_paths(out_dir: Path) -> list[Path]:
    """What a run logs after an evaluation into ``out_dir``: ``config.yaml`` and the
    EVAL_ARTIFACTS (``error_matches.npz`` when it was written)."""
    paths = [Path(out_dir) / a for a in ("config.yaml", *EVAL_ARTIFACTS)]
    return [p for p in paths if p.name != erroranalysis.MATCHES_FILE or p.exists()]


def coco_metrics(coco_gt, detections: list[dict]) -> dict[str, float]:
    """Score COCO-format ``detections`` against ``coco_gt``; all keys of METRIC_KEYS, in percent,
    equal to pycocotools' COCOeval (computed by faster-coco-eval when installed). An area range
    without ground truth (COCOeval's -1) and no detections at all score 0."""
    return cocoeval.evaluate(coco_gt, detections)


def write_eval_outputs(out_dir: Path, coco_gt, detections: list[dict], metrics: dict[str, float],
                       precision=None) -> dict[str, float]:
    """``metrics.json``, ``detections.json`` (+ ``.gz``, what is logged), ``eval_matches.npz``,
    ``errors.json``, ``pr_curves.png`` and ``error_matches.npz``. Returns ``metrics`` plus the
    error analysis' scalars (``err/...``: :meth:`erroranalysis.ErrorAnalysis.metrics`), which
    ``metrics.json`` holds. ``precision``: COCOeval's precision array the metrics came from
    (spares the error analysis a second evaluation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis, error_matches = erroranalysis.analyze_and_match(coco_gt, detections, precision)
    erroranalysis.write(out_dir, analysis, error_matches)
    metrics = {**metrics, **analysis.metrics()}
    text = json.dumps(detections)
    (out_dir / "detections.json").write_text(text)
    with gzip.open(out_dir / "detections.json.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    cocoeval.match(coco_gt, detections).save(out_dir / "eval_matches.npz")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def to_coco_results(outputs: list[dict], image_ids: list[int], label_to_cat_id: list[int]) -> list[dict]:
    """Per-image detections (xyxy, contiguous labels) → COCO results (xywh, category ids)."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().double()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, out["scores"].tolist(), out["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label_to_cat_id[label]),
                            "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
    return results


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, label_to_cat_id: list[int],
            progress: bool = True, amp=None, forward_time: ForwardTime | None = None) -> list[dict]:
    """Run ``model`` over ``loader`` (yields (images, targets)) → COCO results list. ``amp``: an
    :class:`~ioulab.detector.engine.amp.AmpPolicy` whose autocast wraps the forward (None: off).

    ``forward_time`` gains the seconds of each ``model(...)`` call and its images: the forward
    alone (loading, the copy to ``device`` and the conversion to COCO results are outside the
    clock), the first batch left out as warm-up when there is more than one."""
    model.eval()
    results: list[dict] = []
    warmup = 1 if len(loader) > 1 else 0
    for i, (images, targets) in enumerate(tqdm(loader, desc="eval", disable=not progress, leave=False)):
        inputs = [img.to(device, non_blocking=True) for img in images]
        # On CUDA, timed() synchronises before reading the clock at the start and at the stop: the
        # copies above and the forward's kernels run asynchronously, so the first wait keeps the
        # copies out and the second counts the forward's work, not just its launch. On a CPU no
        # synchronize is needed (none is made).
        with timed(device) as clock, amp.autocast() if amp is not None else contextlib.nullcontext():
            outputs = model(inputs)
        if forward_time is not None and i >= warmup:
            forward_time.add(clock.seconds, len(inputs))
        results += to_coco_results(outputs, [t["image_id"] for t in targets], label_to_cat_id)
    return results


def evaluate_model(model: torch.nn.Module, dataset, label_to_cat_id: list[int], inference, device,
                   num_workers: int = 0, out_dir=None, progress: bool = True, amp=None) -> dict[str, float]:
    """Predict on ``dataset`` (a CocoDetection) and score it, under ``amp`` (the training's AMP
    policy, None: off). With ``out_dir``, writes ``detections.json`` (COCO results) and the
    EVAL_ARTIFACTS there, and the metrics gain the error analysis' ``err/...`` scalars. The
    metrics include ``time/infer_ms_per_image``: the model's forward time per image in this
    evaluation, at ``inference.batch_size`` on ``device`` (see :func:`predict`)."""
    from ioulab.detector.data.loader import build_eval_loader

    loader = build_eval_loader(dataset, inference.batch_size, num_workers)
    forward_time = ForwardTime()
    detections = predict(model, loader, device, label_to_cat_id, progress=progress, amp=amp,
                         forward_time=forward_time)
    return score(dataset.coco, detections, out_dir, forward_time)


def score(coco_gt, detections: list[dict], out_dir=None, forward_time: ForwardTime | None = None) -> dict[str, float]:
    """The metrics of ``detections`` (COCO results of the whole dataset, in dataset order), plus
    ``time/infer_ms_per_image`` of ``forward_time`` when it timed any image; with ``out_dir``, the
    EVAL_ARTIFACTS written there. The one scoring path of single-process and distributed
    evaluation (``engine/distributed.py`` gathers the shards, then calls this)."""
    metrics, precision = cocoeval.evaluate_with_precision(coco_gt, detections)
    metrics = {**metrics, **(forward_time.metrics() if forward_time else {})}
    if out_dir is not None:
        metrics = write_eval_outputs(Path(out_dir), coco_gt, detections, metrics, precision)
    return metrics


def load_trained(checkpoint_path, overrides=(), device: str = "auto"):
    """Rebuild the model of a checkpoint with its stored config plus ``overrides``.

    Only test-time keys (``inference.*``) and data locations may differ from the stored config; a
    change of ``model.*`` fails with the keys that differ. Returns (model, cfg, dataset_info, device).
    """
    from ioulab.detector import config as C
    from ioulab.detector.engine import checkpoint_file as ckpt_io
    from ioulab.detector.engine.runtime import resolve_device
    from ioulab.detector.model import build_model

    path = Path(checkpoint_path)
    state = ckpt_io.load(path)
    cfg = C.from_dict(state["config"], source=f"{path} (stored config)")
    C.apply_overrides(cfg, list(overrides) if not isinstance(overrides, dict) else overrides)
    C.validate(cfg)  # the same checks as ioulab train (e.g. an IoU mode needs the IoU head)
    ckpt_io.check_compatible(state, cfg, path, prefix="model.")
    dev = resolve_device(cfg.train.device if device == "auto" else device)
    info = state["dataset"]
    model = build_model(cfg.model, info["num_classes"], cfg.inference, load_pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ckpt_io.CheckpointError(f"{path}: weights do not fit the model built from its config: {exc}") from exc
    return model.to(dev).eval(), cfg, info, dev


def evaluate_checkpoint(checkpoint_path, overrides=(), out_dir=None, progress: bool = True):
    """Evaluate a saved checkpoint on its config's validation split (with ``overrides``), under
    the AMP policy its training used (``train.amp``, ``train.amp_dtype``). Returns (metrics, cfg)."""
    from ioulab.detector.engine.amp import amp_policy
    from ioulab.detector.data.datasets import build_dataset

    model, cfg, info, dev = load_trained(checkpoint_path, overrides)
    val_set = build_dataset(cfg.data, "val")
    metrics = evaluate_model(model, val_set, info["label_to_cat_id"], cfg.inference, dev,
                             num_workers=cfg.data.num_workers, out_dir=out_dir, progress=progress,
                             amp=amp_policy(cfg.train, dev))
    return metrics, cfg
