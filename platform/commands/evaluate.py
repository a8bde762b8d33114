"""`ioulab eval`: evaluate a saved checkpoint (test-time overrides allowed)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ioulab.platform import mlflow_names
from ioulab.platform.commands.train import add_tracking_arguments, open_run, print_errors, print_metrics
from ioulab.platform.smoke import add_smoke_test, announce, smoke_overrides


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a model_XXXXXXX.pth written by ioulab train")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="test-time override, e.g. inference.nms.type=diou (model.* must match)")
    p.add_argument("--out", default=None, help="output folder (default: runs/eval-<time>)")
    add_tracking_arguments(p)
    p.add_argument("--no-progress", action="store_true")
    add_smoke_test(p, "the checkpoint's model on the 6 validation images of a tiny synthetic set")


def run(args) -> int:
    from ioulab.detector import config as C
    from ioulab.detector.engine import checkpoint_file as ckpt_io
    from ioulab.detector.engine.amp import amp_policy
    from ioulab.detector.data.datasets import build_dataset
    from ioulab.detector.engine.evaluate import artifact_paths, evaluate_model, load_trained

    ckpt_io.check_file(args.checkpoint)  # a missing or broken file fails before any MLflow run
    announce(args, "ioulab eval")
    kind = "eval-smoke-test" if args.smoke_test else "eval"
    out = Path(args.out or f"runs/{kind}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    # Checkpoint, config (the same checks as train) and data first: a failure creates no MLflow run.
    model, cfg, info, device = load_trained(args.checkpoint, smoke_overrides(args, data_only=True))
    val_set = build_dataset(cfg.data, "val")
    tracker = open_run(args, out.name, out,
                       mlflow_names.command_tags("eval", checkpoint=str(Path(args.checkpoint).resolve())))
    status = "FAILED"
    try:
        metrics = evaluate_model(model, val_set, info["label_to_cat_id"], cfg.inference, device,
                                 num_workers=cfg.data.num_workers, out_dir=out, progress=not args.no_progress,
                                 amp=amp_policy(cfg.train, device))
        (out / "config.yaml").write_text(C.dump_yaml(cfg))
        if tracker is not None:
            tracker.log_params(mlflow_names.config_params(cfg))
            tracker.log_metrics(metrics, 0)
            for path in artifact_paths(out):
                tracker.log_artifact(path)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.close(status)
    print_metrics(metrics)
    print_errors(out)
    print(f"outputs: {out}  (metrics.json, detections.json, errors.json, pr_curves.png)")
    return 0
