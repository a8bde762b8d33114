"""`ioulab train`: one training run + evaluation, logged to MLflow."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ioulab.detector import config as C
from ioulab.platform import mlflow_names
from ioulab.platform.smoke import add_smoke_test, announce, smoke_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE|PRESET",
                   help=f"YAML file or preset ({', '.join(C.preset_names())}); default: {C.DEFAULT_PRESET}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (e.g. model.roi_heads.box_loss.type=giou)")
    p.add_argument("--out", default=None, help="run folder (default: runs/train-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out")
    p.add_argument("--workers", type=_at_least_one, default=1, metavar="N",
                   help="data-parallel worker processes on this machine (DDP: gloo on CPU, one GPU each "
                        "on CUDA); train.batch_size is the global batch, split over them (default: 1)")
    add_tracking_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_smoke_test(p, "synthetic data of 12 images, a tiny model of the config's kind, 4 iterations")


def add_tracking_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help=mlflow_names.TRACKING_URI_HELP)
    p.add_argument("--experiment", default="ioulab", help="MLflow experiment name")
    p.add_argument("--mlflow-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="bound of each MLflow request; training waits at most this long per delivery "
                        "attempt when the server hangs (default: $MLFLOW_HTTP_REQUEST_TIMEOUT or 5)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected whole seconds >= 1, got {text!r}")
    return value


def open_run(args, run_name: str, out: Path, tags: dict[str, str]):
    """The MLflow run of a CLI command, or None with --no-mlflow."""
    if args.no_mlflow:
        return None
    from ioulab.platform.tracking import MlflowRun, set_request_timeout

    if getattr(args, "mlflow_timeout", None):
        set_request_timeout(args.mlflow_timeout)
    uri = mlflow_names.resolve_tracking_uri(args.tracking_uri)
    return MlflowRun(uri, args.experiment, run_name=run_name, tags=tags,
                     find_tags={mlflow_names.RUN_DIR: str(out)} if getattr(args, "resume", False) else None,
                     spool=out / "mlflow_pending.jsonl")


class RunOnFirstRecord:
    """A command's MLflow run, created when the first record arrives: a command that fails before
    recording anything (a bad config, bad data, an incompatible checkpoint) leaves no MLflow run."""

    def __init__(self, open_fn):
        self._open = open_fn
        self.run = None

    def _get(self):
        if self.run is None:
            self.run = self._open()
        return self.run

    def log_params(self, params: dict) -> None:
        self._get().log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._get().log_metrics(metrics, step)

    def log_artifact(self, path: Path) -> None:
        self._get().log_artifact(path)

    def close(self, status: str) -> None:
        if self.run is not None:
            self.run.close(status)


def print_metrics(metrics: dict[str, float]) -> None:
    """The AP columns on one line (the error analysis' ``err/...`` scalars are left out: see
    :func:`print_errors`), then the evaluation's forward time as ``ms/img`` when measured."""
    line = "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()
                     if not (mlflow_names.is_error(k) or mlflow_names.is_timing(k)))
    if mlflow_names.INFER_MS_PER_IMAGE in metrics:
        line += f"  ms/img {metrics[mlflow_names.INFER_MS_PER_IMAGE]:.1f}"
    print(line)


def print_errors(out: Path) -> None:
    """Where the AP goes, from the evaluation's ``errors.json`` in ``out`` (if written)."""
    from ioulab.detector.engine import erroranalysis

    path = out / erroranalysis.ERRORS_FILE
    if path.is_file():
        print(erroranalysis.ErrorAnalysis.load(path).summary())


def trained_line(result, wall: float) -> str:
    """What this call trained: a resumed run names the iterations it ran, not the schedule's total."""
    total, start = result.iterations, result.start
    if start == 0:
        return f"trained {total} iterations in {wall:.0f} s ({result.seconds_per_iter:.2f} s/iter)"
    if start >= total:
        return f"all {total} iterations were already trained (resumed at {start}); evaluated in {wall:.0f} s"
    return (f"trained iterations {start + 1}-{total} of {total} (resumed at {start}) in {wall:.0f} s "
            f"({result.seconds_per_iter:.2f} s/iter)")


def run(args) -> int:
    from ioulab.detector.data.datasets import absolutize
    from ioulab.detector.engine.train import resume_point
    from ioulab.platform.commands.launch import train_workers
    from ioulab.detector.model.build import pretrained_weights

    announce(args, "ioulab train")
    cfg = C.load_config(args.config, smoke_overrides(args))  # every key range-checked (ConfigError)
    pretrained_weights(cfg.model)  # ImageNet weights missing: one line now, before data or MLflow
    absolutize(cfg.data)
    kind = "train-smoke-test" if args.smoke_test else "train"
    out = Path(args.out or f"runs/{kind}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    resume_point(cfg, out, args.resume)  # a run that cannot start fails before any MLflow run
    tags = mlflow_names.command_tags("train", run_dir=str(out), config=str(args.config or C.DEFAULT_PRESET))
    # The trainer validates both data splits (and a resumed checkpoint) before its first record.
    tracker = None if args.no_mlflow else RunOnFirstRecord(lambda: open_run(args, out.name, out, tags))
    t0 = time.perf_counter()
    status = "FAILED"
    try:
        result = train_workers(cfg, out, args.workers, logger=tracker, resume=args.resume,
                               progress=not args.no_progress)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"  # Ctrl-C: `--resume` continues from the last checkpoint
        raise
    finally:
        if tracker is not None:
            tracker.close(status)
    wall = time.perf_counter() - t0
    (out / "timing.json").write_text(json.dumps({"wall_seconds": wall, "iterations": result.iterations,
                                                 "resumed_from": result.start,
                                                 "seconds_per_iter": result.seconds_per_iter}, indent=2))
    print("\n" + trained_line(result, wall))
    print_metrics(result.metrics)
    print_errors(out)
    print(f"outputs:    {out}  (metrics.json, detections.json, checkpoints/)")
    if tracker is not None and tracker.run is not None:
        print(f"MLflow run: {tracker.run.run_id} in {tracker.run.tracking_uri}")
        print(f"  UI: mlflow ui --backend-store-uri {tracker.run.tracking_uri}   then open http://127.0.0.1:5000")
    return 0
