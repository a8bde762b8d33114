"""A training trial of N data-parallel workers (``resources: {workers: N, cpu: K, gpu: G}``).

Ray 2.60 (Train V2) runs Train inside Tune this way: the Tune *function* trainable builds and fits a
``ray.train.torch.TorchTrainer`` (a Trainer passed directly to a Tuner is deprecated). The Tune
trial reserves only a token CPU (``space.DDP_TRIAL_CPU``) and the N workers reserve K CPUs and G
GPUs each, so a trial never holds a GPU while its workers wait for one (no nested deadlock).

Each worker runs the detector's trainer (``engine.train.train``) inside the process group Ray Train
created (gloo on CPU, nccl with GPUs); rank 0 opens the trial's MLflow child run and reports each
checkpoint with ``ray.train.report`` (every rank reports at the same iterations: Ray Train waits for
all of them). A worker that dies makes Ray Train restart the group (``FailureConfig``, the space's
``max_failures``) from the last reported checkpoint (``ray.train.get_checkpoint``); the child run is
found again by its Tune trial id and steps already in MLflow are not sent twice. At the end the trial
reports the workers' final result and checkpoint to Tune once (``final.json``, as single-process
trials do). Tune sees no intermediate results of these trials (ASHA cannot stop them early).
"""
from __future__ import annotations

import time
from pathlib import Path

import ray
import ray.train
import torch
from ray import tune
from ray.train.torch import TorchTrainer

from ioulab.detector import config as C
from ioulab.platform import mlflow_names
from ioulab.platform.sweep import trainable


def scaling_config(resources: dict) -> ray.train.ScalingConfig:
    """N workers of ``resources`` (the stage's ``cpu``/``gpu`` per worker)."""
    use_gpu = resources["gpu"] > 0
    per_worker = {"CPU": resources["cpu"], **({"GPU": resources["gpu"]} if use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=resources["workers"], use_gpu=use_gpu,
                                   resources_per_worker=per_worker)


def train_ddp_trial(cfg: C.Config, ctx: dict, point: dict, trial_id: str, started: float) -> None:
    """The Tune trainable's body for N > 1 workers: fit the TorchTrainer, report its final result."""
    out_dir = Path.cwd() / "run"
    previous = tune.get_checkpoint()  # a retried or restored Tune trial continues its checkpoint
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": C.to_dict(cfg), "ctx": ctx, "point": point, "trial_id": trial_id,
                           "out_dir": str(out_dir)},
        scaling_config=scaling_config(ctx["resources"]),
        run_config=ray.train.RunConfig(name=f"ddp-{trial_id}", storage_path=str(Path.cwd() / "ddp"),
                                       failure_config=ray.train.FailureConfig(
                                           max_failures=ctx.get("max_failures", 0))),
        resume_from_checkpoint=ray.train.Checkpoint(previous.path, previous.filesystem) if previous else None)
    result = trainer.fit()
    metrics = {**result.metrics, "trial_seconds": time.perf_counter() - started}
    with result.checkpoint.as_directory() as d:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _device(resources: dict) -> str:
    """A worker's device: the GPU Ray Train gave it when there is one, else CPU."""
    if resources["gpu"] > 0 and torch.cuda.is_available():
        import ray.train.torch

        return str(ray.train.torch.get_device())
    return "cpu"


def _restore(out_dir: Path, tracker) -> int:
    """Rank 0's starting iteration: Ray Train's latest checkpoint (copied into ``out_dir``); when
    Ray Train gives none but this node's ``out_dir`` holds checkpoints of an earlier attempt of the
    group, the newest of those (resume is exact from any checkpoint; steps logged twice are not
    sent to MLflow twice).

    Why the fallback: Ray Train 2.60 hands a restarted group the newest checkpoint its controller
    has registered, and a report made well under a second before a worker dies can be lost (a
    standalone TorchTrainer of 2 workers reporting every 0.5 s, rank 0 SIGKILLed right after its
    first report, restarted with no checkpoint; killed 0.5 s after its sixth, it restarted from
    the fifth). Only the newest checkpoint is at risk; on another node the group continues from
    Ray Train's registered one."""
    from ioulab.detector.engine import checkpoint_file as ckpt_io

    checkpoint = ray.train.get_checkpoint()
    local = ckpt_io.latest_checkpoint(out_dir / "checkpoints")
    print(f"[ioulab] worker group starts: Ray Train checkpoint {checkpoint}, local {local}", flush=True)
    if checkpoint is None and local is not None:
        return ckpt_io.checkpoint_iteration(local)
    return trainable._restore_checkpoint(out_dir, tracker, checkpoint)


def _worker_loop(config: dict) -> None:
    """One DDP worker of the trial (see the module docstring)."""
    from ioulab.detector.engine.train import train

    rank = ray.train.get_context().get_world_rank()
    trainable._use_assigned_cpus()
    ctx, point, trial_id = config["ctx"], config["point"], config["trial_id"]
    cfg = C.from_dict(config["cfg"], source="sweep trial")
    cfg.train.device = _device(ctx["resources"])
    out_dir = Path(config["out_dir"])
    tracker = logger = None
    start = 0
    if rank == 0:
        gpus = trainable.gpu_assignment()
        tags = {**mlflow_names.placement_tags(trainable._node_id(), cfg.train.device, gpus["gpu_ids"],
                                              gpus["gpu_share"]),
                mlflow_names.RUN_DIR: str(out_dir)}
        tracker = trainable.open_trial_run(ctx, point, trial_id, tags)
        logger = trainable._TeeLogger(tracker)
        start = _restore(out_dir, tracker)
    base = {"node_id": trainable._node_id(), "stage": "train", "point_index": point["index"], "final": 0,
            "device": cfg.train.device, "workers": ctx["resources"]["workers"]}

    def report(result: dict, model_file: Path | None, final: bool = False) -> None:
        if rank == 0:
            losses = {k: v for k, v in logger.latest.items() if mlflow_names.is_loss(k)}
            trainable._report({**losses, **result}, tracker, model_file, final=final, api=ray.train)
        else:
            ray.train.report(result, checkpoint=None)

    try:
        result = train(cfg, out_dir, logger=logger, resume=True, progress=False,
                       on_checkpoint=lambda it, path, m: report({**(m or {}), **base, "iteration": it}, Path(path)))
    except BaseException:
        if tracker is not None:
            tracker.set_tags(mlflow_names.status_tag("FAILED"))
            tracker.close("FAILED")
        raise
    report({**result.metrics, **base, "final": 1, "iteration": result.iterations, "resumed_from": start,
            "seconds_per_iter": result.seconds_per_iter},
           Path(result.checkpoint), final=True)
    if tracker is not None:
        tracker.set_tags(mlflow_names.status_tag("FINISHED"))
        tracker.close("FINISHED")
