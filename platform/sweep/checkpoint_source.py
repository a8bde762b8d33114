"""Where a sweep's evaluations find their checkpoint, checked before Ray starts.

A space file's ``checkpoint:`` is a path (a ``model_XXXXXXX.pth`` file, or a run folder: its
newest checkpoint) or ``mlflow:<run id>``: the run's checkpoint artifact (``*.pth``), else its
``ioulab.checkpoint`` tag (set on the training trials of a sweep), else the newest checkpoint of
its recorded run folder (``ioulab.run_dir``, set by ``ioulab train``). The result is a reference
the trials read (:func:`ioulab.platform.sweep.trainable.fetch_checkpoint`): a local path, a URI,
or ``runs:/<run id>/<artifact>``. :func:`check_checkpoint` then reads a local checkpoint's stored
config and checks every evaluation's config against it. Imports neither torch nor Ray (torch only
inside :func:`check_checkpoint`).
"""
from __future__ import annotations

import re
from pathlib import Path

from ioulab.detector import config as C
from ioulab.platform import mlflow_names
from ioulab.platform.sweep.space import MLFLOW_PREFIX, Plan, SpaceError, check_trial_config

_NAME = re.compile(r"^model_\d{7}\.pth$")


def newest_in(folder: Path) -> Path | None:
    """The newest ``model_XXXXXXX.pth`` in ``folder`` or ``folder/checkpoints``."""
    for d in (folder, folder / "checkpoints"):
        found = sorted(p for p in d.glob("model_*.pth") if _NAME.match(p.name)) if d.is_dir() else []
        if found:
            return found[-1]
    return None


def _from_path(text: str, where: str) -> str:
    path = Path(text).expanduser().resolve()
    if path.is_file():
        return str(path)
    if path.is_dir():
        found = newest_in(path)
        if found is None:
            raise SpaceError(f"{where}: checkpoint: {path} holds no model_XXXXXXX.pth (nor checkpoints/)")
        return str(found)
    raise SpaceError(f"{where}: checkpoint: {path} does not exist")


def _from_mlflow(run_id: str, where: str, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise SpaceError(f"{where}: checkpoint: MLflow run {run_id} not found in {tracking_uri} "
                         f"({str(exc).splitlines()[0][:200]})") from None

    def walk(prefix: str | None) -> list[str]:
        out = []
        for info in client.list_artifacts(run_id, prefix):
            out += walk(info.path) if info.is_dir else [info.path]
        return out

    artifacts = sorted(p for p in walk(None) if p.endswith(".pth"))
    if artifacts:
        return f"runs:/{run_id}/{artifacts[-1]}"
    tagged = run.data.tags.get(mlflow_names.CHECKPOINT)
    if tagged and ("://" in tagged or Path(tagged).is_file()):
        return tagged
    run_dir = run.data.tags.get(mlflow_names.RUN_DIR)
    if run_dir and Path(run_dir).is_dir():
        found = newest_in(Path(run_dir))
        if found is not None:
            return str(found)
    raise SpaceError(f"{where}: checkpoint: MLflow run {run_id} has no .pth artifact, no readable "
                     f"{mlflow_names.CHECKPOINT} tag ({tagged!r}) and no run folder with checkpoints ({run_dir!r})")


def resolve_checkpoint(source: str, where: str, tracking_uri: str) -> str:
    """A checkpoint reference the trials can read; :class:`SpaceError` if there is none."""
    if source.startswith(MLFLOW_PREFIX):
        return _from_mlflow(source[len(MLFLOW_PREFIX):].strip(), where, tracking_uri)
    if "://" in source and not source.startswith("file://"):
        return source  # a storage URI: read by the trial (pyarrow), not checked here
    return _from_path(source.removeprefix("file://"), where)


def check_checkpoint(plan: Plan, ref: str) -> None:
    """Before Ray starts: a local checkpoint must be an ioulab checkpoint, and each evaluation's
    config (its stored config + the space's fixed keys + the point) must be valid, as ``ioulab
    eval`` would check it. A URI or an MLflow artifact is left to the trials."""
    if "://" in ref:
        return
    from ioulab.detector.engine import checkpoint_file as ckpt_io  # torch

    try:
        state = ckpt_io.load(ref)
    except ckpt_io.CheckpointError as exc:
        raise SpaceError(f"{plan.space_file}: checkpoint: {exc}") from None
    for point in plan.eval_points:
        cfg = C.from_dict(state["config"], source=f"{ref} (stored config)")
        try:
            C.apply_overrides(cfg, dict(plan.eval_overrides), source=f"{plan.space_file} (set)")
            C.apply_overrides(cfg, dict(point.overrides), source=f"{plan.space_file} (grid point {point.label})")
        except C.ConfigError as exc:
            raise SpaceError(str(exc)) from None
        check_trial_config(cfg, plan.space_file, point.label)
