"""`ioulab selftest [--device cpu|cuda]`: the first command to run on a new node.

It checks, on the chosen device, everything the CPU test suite cannot prove about a GPU:

    prroi/<dtype>       the PrRoIPool op (forward, feature and box-coordinate gradients) in float32,
                        float16 and bfloat16 against the float64 CPU reference (pure PyTorch)
    train/amp-<dtype>   a few mixed-precision training iterations of cpu_tiny_iounet (both IoU-head
                        losses) on a tiny synthetic dataset: finite losses, a checkpoint written
    eval/<mode>         an evaluation of that checkpoint in every inference mode: finite metrics
    timer/sync          the bench timer synchronises the device around each timed region

and prints one line per check (PASS/FAIL, the measured error against its tolerance, the time).
Exit code 0 when every check passes, 1 otherwise. Nothing is downloaded; everything is written
to a temporary folder that is removed at the end (``--keep DIR`` keeps it).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Tolerance of the op against the float64 reference, in units of the dtype's machine epsilon,
# relative to the largest reference magnitude. The inputs are first rounded to the dtype and the
# reference is computed on the rounded values, so only the kernel's own rounding counts: outputs
# and gradients are a weighted sum accumulated in float32 and rounded once to the dtype (about
# 1 eps); 8 eps leaves room for the box-gradient's difference of two such sums.
TOLERANCE_EPS = 8.0
AMP_DTYPES = {"cpu": ("bfloat16",), "cuda": ("float16", "bfloat16")}
TINY_MODEL = [
    "model.min_size=96", "model.max_size=96",
    "model.rpn.pre_nms_top_n_train=200", "model.rpn.post_nms_top_n_train=64",
    "model.rpn.pre_nms_top_n_test=100", "model.rpn.post_nms_top_n_test=32",
    "model.roi_heads.batch_size_per_image=32", "model.roi_heads.representation_size=64",
    "model.iou_head.representation_size=64", "model.iou_head.roi_generator.per_img=32",
    "model.backbone.tiny_widths=[8,16,16,16]", "model.backbone.fpn_channels=16",
    "train.batch_size=2", "train.max_iters=3", "train.warmup_iters=1", "train.log_period=1",
    "train.checkpoint_period=3", "data.num_workers=0", "inference.batch_size=3",
]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    seconds: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR and keep it (synthetic data, checkpoints) instead of a temp folder")


def run(args) -> int:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from ioulab.detector.errors import UserError

        class NoCudaError(UserError, RuntimeError):
            pass

        raise NoCudaError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device "
                          f"(torch.version.cuda={torch.version.cuda}); check the driver and CUDA_VISIBLE_DEVICES")
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ioulab-selftest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"ioulab selftest on {_describe(device)}; work folder {workdir}", flush=True)
    checks: list[Check] = []
    try:
        for check in all_checks(device, workdir):
            checks.append(check)
            print(_format(check), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    failed = [c.name for c in checks if not c.passed]
    print(f"{len(checks) - len(failed)} passed, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def all_checks(device, workdir: Path):
    """Yield each :class:`Check` as it finishes (the op, AMP training, every inference mode, timers)."""
    import torch

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        yield _timed(f"prroi/{str(dtype).removeprefix('torch.')}", lambda: check_prroi(device, dtype))
    data_root = _tiny_dataset(workdir)
    checkpoint = None
    for amp_dtype in AMP_DTYPES[device.type]:
        for iou_loss in ("smooth_l1", "bce"):
            out = workdir / f"train-{amp_dtype}-{iou_loss}"
            check = _timed(f"train/amp-{amp_dtype}/{iou_loss}",
                           lambda: check_amp_training(device, data_root, out, amp_dtype, iou_loss))
            yield check
            if check.passed and checkpoint is None:
                checkpoint = _newest_checkpoint(out)
    from ioulab.detector.config import CHOICES

    for mode in CHOICES["inference.mode"]:
        if checkpoint is None:
            yield Check(f"eval/{mode}", False, "no checkpoint: every training check failed", 0.0)
            continue
        yield _timed(f"eval/{mode}", lambda: check_inference_mode(device, checkpoint, mode))
    yield _timed("timer/sync", lambda: check_timer_sync(device))


def _timed(name: str, fn: Callable[[], tuple[bool, str]]) -> Check:
    t0 = time.perf_counter()
    try:
        passed, detail = fn()
    except Exception as exc:  # a check that crashes fails; the others still run
        last = traceback.extract_tb(exc.__traceback__)[-1]
        passed, detail = False, f"{type(exc).__name__}: {exc} ({Path(last.filename).name}:{last.lineno})"
    return Check(name, passed, detail, time.perf_counter() - t0)


def _format(check: Check) -> str:
    return f"  {'PASS' if check.passed else 'FAIL'}  {check.name:<28} {check.seconds:6.1f} s  {check.detail}"


def _describe(device) -> str:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{device} ({props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                f"torch {torch.__version__}, CUDA {torch.version.cuda})")
    return f"cpu (torch {torch.__version__}, {torch.get_num_threads()} threads)"


# --- the op -----------------------------------------------------------------------------------

def _prroi_case(seed: int = 0):
    """Maps and RoIs covering inside, partly off-map, off-map, tiny and large boxes (float64)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    images, channels, height, width, rois = 2, 8, 13, 17, 40
    features = torch.randn(images, channels, height, width, generator=gen, dtype=torch.float64)
    scale = torch.tensor([width, height], dtype=torch.float64)
    xy = torch.rand(rois, 2, generator=gen, dtype=torch.float64) * scale * 2.4 - 3
    wh = torch.rand(rois, 2, generator=gen, dtype=torch.float64) * 14 + 0.3
    batch = torch.randint(0, images, (rois, 1), generator=gen).to(torch.float64)
    return features, torch.cat([batch, xy, xy + wh], 1), torch.randn(rois, channels, 3, 3, generator=gen,
                                                                     dtype=torch.float64)


def _pool_with_grads(features, rois, grad_out, backend):
    import torch

    from ioulab.detector.ops import prroi_pool

    features = features.detach().clone().requires_grad_()
    rois = rois.detach().clone().requires_grad_()
    out = prroi_pool(features, rois, 3, 0.5, backend=backend)
    g_features, g_rois = torch.autograd.grad(out, [features, rois], grad_out.to(out.dtype))
    return out, g_features, g_rois


def check_prroi(device, dtype) -> tuple[bool, str]:
    """The op on ``device`` in ``dtype`` against the float64 CPU reference on the same rounded inputs."""
    import torch

    features, rois, grad_out = _prroi_case()
    # Round the inputs to the dtype first, so the reference sees exactly what the kernel sees.
    features, rois, grad_out = (t.to(dtype).to(torch.float64) for t in (features, rois, grad_out))
    expected = _pool_with_grads(features, rois, grad_out, "reference")
    actual = _pool_with_grads(features.to(device, dtype), rois.to(device, dtype), grad_out.to(device, dtype),
                              "extension")
    if actual[0].dtype != dtype:
        return False, f"output dtype {actual[0].dtype}, expected {dtype}"
    tol = TOLERANCE_EPS * torch.finfo(dtype).eps
    errors = []
    for name, exp, act in zip(("out", "d_features", "d_rois"), expected, actual):
        scale = exp.abs().max().item() + 1e-12
        errors.append((name, (act.double().cpu() - exp).abs().max().item() / scale))
    worst = max(e for _, e in errors)
    detail = ", ".join(f"{n} {e:.1e}" for n, e in errors) + f" (relative; tolerance {tol:.1e})"
    return worst <= tol, detail


# --- training and evaluation ------------------------------------------------------------------

def _tiny_dataset(workdir: Path) -> Path:
    from ioulab.detector.data.synth import generate_synthetic

    return generate_synthetic(workdir / "data", num_train=8, num_val=6, size=96, seed=0, progress=False)


def _newest_checkpoint(out: Path) -> Path | None:
    from ioulab.detector.engine.checkpoint_file import latest_checkpoint

    return latest_checkpoint(out / "checkpoints")


def check_amp_training(device, data_root: Path, out: Path, amp_dtype: str, iou_loss: str) -> tuple[bool, str]:
    """A few autocast iterations of cpu_tiny_iounet: every loss finite (the trainer raises otherwise)."""
    import json

    from ioulab.detector import config as C
    from ioulab.detector.engine.train import train

    cfg = C.load_config("cpu_tiny_iounet", [
        f"data.root={data_root}", *TINY_MODEL, "train.amp=true", f"train.amp_dtype={amp_dtype}",
        f"train.device={device}", f"model.iou_head.loss={iou_loss}"])
    result = train(cfg, out, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    iou = [r["loss/iou"] for r in records if "loss/iou" in r]
    if len(records) != cfg.train.max_iters or not iou:
        return False, f"{len(records)} logged iterations ({cfg.train.max_iters} expected), IoU loss logged: {bool(iou)}"
    return True, f"loss/total {records[0]['loss/total']:.3f} -> {records[-1]['loss/total']:.3f}, " \
                 f"loss/iou {iou[-1]:.4f}, AP {result.metrics['AP']:.1f}"


def check_inference_mode(device, checkpoint: Path, mode: str) -> tuple[bool, str]:
    import math

    from ioulab.detector.engine.evaluate import evaluate_checkpoint
    from ioulab.platform import mlflow_names

    metrics, _ = evaluate_checkpoint(checkpoint, [f"inference.mode={mode}", f"train.device={device}"],
                                     progress=False)
    bad = {k: v for k, v in metrics.items()   # the APs (percent); the forward time is in ms
           if not mlflow_names.is_timing(k) and not (math.isfinite(v) and 0.0 <= v <= 100.0)}
    if bad:
        return False, f"metrics outside [0, 100]: {bad}"
    return True, "  ".join(f"{k} {metrics[k]:.1f}" for k in ("AP", "AP50", "AP90"))


# --- timers -----------------------------------------------------------------------------------

def check_timer_sync(device) -> tuple[bool, str]:
    """The bench timer synchronises ``device`` before it starts and before it stops the clock
    (:func:`~ioulab.platform.bench.timing.timer_synchronises`, which records the calls and needs no
    GPU).

    On CUDA it also times a queue of matrix products: the synchronised timer must see the GPU's
    work (within 2x of CUDA events), which an unsynchronised timer does not."""
    import torch

    from ioulab.platform.bench import timing

    if not timing.timer_synchronises(device):
        want = "sync, clock, body, sync, clock" if device.type == "cuda" else "no synchronisation"
        return False, f"the bench timer does not synchronise {device.type} as needed (expected {want})"
    if device.type != "cuda":
        return True, "no device synchronisation needed on CPU (and none made)"
    a = torch.randn(4096, 4096, device=device)

    def work():
        for _ in range(20):
            a @ a

    timed = timing.time_call(work, repeats=3, warmup=1, device=device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    stop.record()
    stop.synchronize()
    events = start.elapsed_time(stop) / 1000
    ok = 0.5 <= timed / events <= 2.0
    return ok, f"timer {timed * 1000:.1f} ms vs CUDA events {events * 1000:.1f} ms"
