"""Tune trainables: thin adapters over the detector's single-run trainer and evaluator.

``train_trial(config)``: one training run. Every checkpoint the trainer writes is reported to Tune
(``tune.report(metrics, checkpoint=...)``, via ``on_checkpoint``); a retried or restored trial
copies its last Tune checkpoint into ``out_dir/checkpoints`` and continues it exactly
(``train(resume=True)``). ``eval_trial(config)``: one evaluation of a trained checkpoint with
inference-time overrides; it trains nothing.

Each trial logs into exactly one MLflow child run, found again by its Tune trial id on retry or
restore. MLflow records not yet delivered travel inside each Tune checkpoint
(``mlflow_pending.json``) and, at the end of an attempt, into the sweep's spool folder; the driver
replays both, so an outage loses nothing.

Every trial first checks that its node imports the driver's ioulab code (``driver_code``, passed
with ``tune.with_parameters``; a mismatch fails it once, not retried), then runs on the device Ray
gave it: CUDA only with a GPU share, a fractional share capping its CUDA memory (:func:`place_trial`).

``config`` (the Tune param space): ``{"ioulab": <sweep context>, "trial": <name of a point>}``
(the grid is over point names, so Tune's status table reads ``train-002 box_loss.type=giou,...``).
Context: sweep, sweep_id, experiment, tracking_uri, parent_run_id, spool_dir, stage, stage_dir
(the stage's Tune experiment folder), config (the stage's fixed config, ``config.to_dict``),
eval_overrides, points (name → point). Point: index, label, overrides; for evaluations also
checkpoint (path, URI or ``runs:/<run id>/<artifact>``), train_trial_id, train_run_id.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from ioulab.detector import config as C
from ioulab.detector.engine import checkpoint_file as ckpt_io
from ioulab.detector.engine.evaluate import artifact_paths, evaluate_checkpoint
from ioulab.detector.engine.train import resolve_device, train
from ioulab.platform import mlflow_names
from ioulab.platform.sweep.codecheck import CodeMismatchError, check_same_code
from ioulab.platform.tracking import MlflowRun

PENDING_FILE = "mlflow_pending.json"
FINAL_FILE = "final.json"


class _TeeLogger:
    """The trainer's logger: forwards to MLflow and keeps the newest value of every metric."""

    def __init__(self, tracker: MlflowRun):
        self.tracker = tracker
        self.latest: dict[str, float] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.latest.update(metrics)
        self.tracker.log_metrics(metrics, step)

    def log_artifact(self, path: Path) -> None:
        self.tracker.log_artifact(path)


def point_name(stage: str, point: dict) -> str:
    return f"{stage}-{point['index']:03d} {point['label']}"


def point_of(config: dict) -> dict:
    """The grid point of a trial's config."""
    return config["ioulab"]["points"][config["trial"]]


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _use_assigned_cpus() -> None:
    """One torch thread per CPU Tune gave this trial (the default would be every core)."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


def gpu_assignment() -> dict[str, Any]:
    """This trial's GPUs as Ray assigned them: ``gpu_ids`` (``ray.get_gpu_ids()``, comma-separated),
    ``gpu_share`` (the trial's GPU resource, e.g. 0.25) and ``cuda_visible_devices`` (as Ray set it)."""
    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return {"gpu_ids": ",".join(str(i) for i in ray.get_gpu_ids()), "gpu_share": float(share),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def trial_device(requested: str, gpu_share: float) -> str:
    """The device of a trial: ``train.device: auto`` means CUDA only if Ray gave the trial (a share
    of) a GPU and torch sees one. Else CPU: a trial never uses a GPU it did not reserve, and on a
    cluster that declares GPUs it does not have (a test cluster) it runs on CPU."""
    if requested != "auto":
        return requested
    return "cuda" if gpu_share > 0 and torch.cuda.is_available() else "cpu"


def memory_fraction(gpu_share: float) -> float | None:
    """The CUDA memory cap of a trial holding ``gpu_share`` of one GPU (``gpu: 0.25``: a quarter of
    its memory, so four evaluations fit on one GPU), or None for a whole GPU or none."""
    return gpu_share if 0 < gpu_share < 1 else None


def place_trial(requested: str, gpu_share: float) -> str:
    """The trial's device (:func:`trial_device`); on CUDA with a fractional GPU, this process's
    CUDA memory is capped to its share (``torch.cuda.set_per_process_memory_fraction``)."""
    device = trial_device(requested, gpu_share)
    fraction = memory_fraction(gpu_share)
    if fraction is not None and torch.device(device).type == "cuda":
        torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
    return device


def open_trial_run(ctx: dict, point: dict, trial_id: str, extra_tags: dict[str, str]) -> MlflowRun:
    """The trial's MLflow child run: created once, found again by (sweep id, trial id)."""
    stage = ctx["stage"]
    tags = mlflow_names.trial_tags(ctx["sweep"], stage, label=point["label"], index=point["index"],
                                   overrides=point["overrides"], status="RUNNING",
                                   parent_run_id=ctx.get("parent_run_id"))
    spool = None
    if ctx.get("spool_dir"):
        spool = Path(ctx["spool_dir"]) / f"{trial_id}-{uuid.uuid4().hex[:8]}.jsonl"
    tracker = MlflowRun(ctx["tracking_uri"], ctx["experiment"], run_name=point_name(stage, point), tags=tags,
                        find_tags=mlflow_names.trial_key(ctx["sweep_id"], trial_id),
                        spool=spool or Path.cwd() / f"{PENDING_FILE}l")
    # Dynamic tags (set again on every attempt: a re-attached run keeps its creation tags).
    tracker.set_tags({**mlflow_names.status_tag("RUNNING"), **extra_tags})
    return tracker


def _restore_checkpoint(out_dir: Path, tracker: MlflowRun, checkpoint) -> int:
    """Continue from ``checkpoint`` (the trial's last Tune or Train checkpoint, or None): its model
    file goes into ``out_dir/checkpoints`` (anything newer there is removed, so the run continues
    exactly that checkpoint) and its undelivered MLflow records are queued again. Returns its
    iteration."""
    ckpt_dir = out_dir / "checkpoints"
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    if checkpoint is None:
        return 0
    try:
        with checkpoint.as_directory() as d:
            d = Path(d)
            latest = ckpt_io.latest_checkpoint(d)
            if latest is not None:
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(latest, ckpt_dir / latest.name)
            if (d / PENDING_FILE).exists():
                tracker.requeue(json.loads((d / PENDING_FILE).read_text()))
            return ckpt_io.checkpoint_iteration(latest) if latest is not None else 0
    except (OSError, ValueError) as exc:  # a checkpoint that vanished: start over, do not fail
        print(f"[ioulab] cannot restore the trial checkpoint ({exc}); training from the start")
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        return 0


def _report(result: dict[str, Any], tracker: MlflowRun, model_file: Path | None = None,
            final: bool = False, api=tune) -> None:
    """``tune.report`` with a checkpoint folder: the model file (hard link, no copy), the MLflow
    records still pending, and for the last report of a trial ``final.json`` (a restore that finds
    it re-reports the result instead of running the trial again). ``api``: ``ray.train`` inside
    the workers of a multi-worker trial (platform/sweep/ddp_trial.py)."""
    with tempfile.TemporaryDirectory(dir=Path.cwd(), prefix=".report-") as d:
        d = Path(d)
        if model_file is not None:
            try:
                os.link(model_file, d / model_file.name)
            except OSError:
                shutil.copy2(model_file, d / model_file.name)
        (d / PENDING_FILE).write_text(json.dumps(tracker.pending_records()))
        if final:
            (d / FINAL_FILE).write_text(json.dumps(result))
        api.report(result, checkpoint=api.Checkpoint.from_directory(str(d)))


def _finished_result(ctx: dict, point: dict, trial_id: str) -> dict | None:
    """The final result of this trial if it had already finished: a restore after the driver died
    finds ``final.json`` in the trial's last checkpoint, or in a newer checkpoint folder the dead
    driver never registered (Tune's experiment snapshot can lag the trial's last report)."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        try:
            with checkpoint.as_directory() as d:
                path = Path(d) / FINAL_FILE
                if path.exists():
                    return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
    if not ctx.get("stage_dir"):
        return None
    import pyarrow.fs

    try:
        trial_dir = f"{ctx['stage_dir'].rstrip('/')}/{point_name(ctx['stage'], point).split(' ')[0]}_{trial_id}"
        fs, path = pyarrow.fs.FileSystem.from_uri(trial_dir)
        found = sorted(i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
                       if i.base_name.startswith("checkpoint_"))
        for folder in reversed(found):
            if fs.get_file_info(f"{folder}/{FINAL_FILE}").type == pyarrow.fs.FileType.File:
                with fs.open_input_stream(f"{folder}/{FINAL_FILE}") as f:
                    return json.loads(f.read().decode())
    except (OSError, ValueError):
        return None
    return None


def _check_code(driver_code: dict | None, node: str) -> None:
    """Fail (without retries: the driver sees ``code_mismatch``) if this node's ioulab is not the
    driver's."""
    if driver_code is None:
        return
    try:
        check_same_code(driver_code, f"node {node}")
    except CodeMismatchError as exc:
        tune.report({"code_mismatch": str(exc), "node_id": node, "final": 0})
        raise


def _begin_trial(config: dict, driver_code: dict | None) -> tuple[dict, dict, str, str] | None:
    """(sweep context, grid point, node id, trial id) of a trial to run, or None when a restored
    trial had already finished: its final result is reported again and nothing else is touched."""
    ctx, point = config["ioulab"], point_of(config)
    node = _node_id()
    trial_id = tune.get_context().get_trial_id()
    finished = _finished_result(ctx, point, trial_id)
    if finished is not None:
        tune.report({**finished, "node_id": node, "restored_final": 1})
        return None
    _check_code(driver_code, node)
    _use_assigned_cpus()
    return ctx, point, node, trial_id


def train_trial(config: dict, driver_code: dict | None = None) -> None:
    """Tune trainable of the training stage (``driver_code``: the driver's ioulab identity)."""
    started = time.perf_counter()
    trial = _begin_trial(config, driver_code)
    if trial is None:
        return
    ctx, point, node, trial_id = trial
    cfg = C.from_dict(ctx["config"], source="sweep config")
    C.apply_overrides(cfg, dict(point["overrides"]), source="sweep grid point")
    C.validate(cfg)  # as ioulab train (the driver checked it too, before Ray started)
    if ctx.get("resources", {}).get("workers", 1) > 1:
        from ioulab.platform.sweep.ddp_trial import train_ddp_trial

        return train_ddp_trial(cfg, ctx, point, trial_id, started)
    gpus = gpu_assignment()
    device = place_trial(cfg.train.device, gpus["gpu_share"])
    if device != resolve_device(cfg.train.device).type:  # "auto" would take a GPU Ray did not give it
        cfg.train.device = device
    out_dir = Path.cwd() / "run"
    placement = mlflow_names.placement_tags(node, device, gpus["gpu_ids"], gpus["gpu_share"])
    tracker = open_trial_run(ctx, point, trial_id, {**placement, mlflow_names.RUN_DIR: str(out_dir)})
    logger = _TeeLogger(tracker)
    start_iteration = _restore_checkpoint(out_dir, tracker, tune.get_checkpoint())
    base = {"node_id": node, "stage": "train", "point_index": point["index"], "final": 0,
            "device": device, **gpus}

    def on_checkpoint(iteration: int, path: Path, metrics: dict[str, float] | None) -> None:
        values = {k: v for k, v in logger.latest.items() if mlflow_names.is_loss(k)}
        _report({**values, **(metrics or {}), **base, "iteration": iteration}, tracker, Path(path))

    try:
        result = train(cfg, out_dir, logger=logger, resume=True, on_checkpoint=on_checkpoint, progress=False)
    except BaseException:
        tracker.set_tags(mlflow_names.status_tag("FAILED"))
        tracker.close("FAILED")
        raise
    losses = {k: v for k, v in logger.latest.items() if mlflow_names.is_loss(k)}
    # The final report first, MLflow's FINISHED second: once MLflow says FINISHED, a restore finds
    # final.json and does not run the trial again.
    _report({**losses, **result.metrics, **base, "final": 1, "iteration": result.iterations,
             "trial_seconds": time.perf_counter() - started, "resumed_from": start_iteration,
             "seconds_per_iter": result.seconds_per_iter}, tracker, Path(result.checkpoint), final=True)
    tracker.set_tags(mlflow_names.status_tag("FINISHED"))
    tracker.close("FINISHED")


def fetch_checkpoint(ref: str, dest: Path, tracking_uri: str) -> Path:
    """A local copy (or the file itself) of a checkpoint reference: a local path, a URI that
    pyarrow reads (``s3://...``), or an MLflow artifact ``runs:/<run id>/<path>``."""
    if ref.startswith("runs:/"):
        import mlflow.artifacts

        dest.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dest),
                                                        tracking_uri=tracking_uri))
    if "://" in ref and not ref.startswith("file://"):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(ref)
        dest.mkdir(parents=True, exist_ok=True)
        local = dest / Path(path).name
        with fs.open_input_stream(path) as src, local.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        return local
    return Path(ref.removeprefix("file://"))


def eval_trial(config: dict, driver_code: dict | None = None) -> None:
    """Tune trainable of the evaluation stage: evaluate one checkpoint once, train nothing."""
    started = time.perf_counter()
    trial = _begin_trial(config, driver_code)
    if trial is None:
        return
    ctx, point, node, trial_id = trial
    gpus = gpu_assignment()
    device = place_trial(ctx["config"]["train"].get("device", "auto"), gpus["gpu_share"])
    tags = {**mlflow_names.placement_tags(node, device, gpus["gpu_ids"], gpus["gpu_share"]),
            mlflow_names.CHECKPOINT: point["checkpoint"]}
    if point.get("train_run_id"):
        tags[mlflow_names.TRAIN_RUN_ID] = point["train_run_id"]
    if point.get("train_trial_id"):
        tags[mlflow_names.TRAIN_TRIAL_ID] = point["train_trial_id"]
    tracker = open_trial_run(ctx, point, trial_id, tags)
    out_dir = Path.cwd() / "eval"
    try:
        local = fetch_checkpoint(point["checkpoint"], out_dir / "input", ctx["tracking_uri"])
        overrides = {**ctx["eval_overrides"], **point["overrides"], "train.device": device}
        metrics, cfg = evaluate_checkpoint(local, overrides, out_dir=out_dir, progress=False)
        step = ckpt_io.checkpoint_iteration(local) or 0
        (out_dir / "config.yaml").write_text(C.dump_yaml(cfg))
        tracker.log_params(mlflow_names.config_params(cfg))
        tracker.log_metrics(metrics, step)
        for path in artifact_paths(out_dir):
            tracker.log_artifact(path)
    except BaseException:
        tracker.set_tags(mlflow_names.status_tag("FAILED"))
        tracker.close("FAILED")
        raise
    _report({**metrics, "node_id": node, "stage": "eval", "point_index": point["index"], "final": 1,
             "iteration": step, "trial_seconds": time.perf_counter() - started, "device": device, **gpus},
            tracker, final=True)
    tracker.set_tags(mlflow_names.status_tag("FINISHED"))
    tracker.close("FINISHED")
