"""The sweep driver: a validated plan → Ray Tune experiments → MLflow runs → a summary.

    plan ─► ray.init ─► parent MLflow run ─► train stage (Tuner) ─► eval stage (Tuner) ─► finalize

Storage layout (``--storage``, default ``./ray_results``)::

    <storage>/<sweep name>/sweep.json        sweep id, parent run id, plan fingerprint
    <storage>/<sweep name>/train/            the Tune experiment of the training stage
    <storage>/<sweep name>/eval/             the Tune experiment of the evaluation stage
    <storage>/<sweep name>/mlflow_spool/     MLflow records the trials could not deliver
    <storage>/<sweep name>/summary.{md,json}

``--resume`` restores each stage with ``Tuner.restore(..., resume_errored=True)``: finished trials
are kept, unfinished and errored ones continue from their last checkpoint. ``finalize`` is
idempotent: it replays undelivered MLflow records, gives every trial exactly one child run with
its final status, and writes the summary to the parent run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterable

from ioulab.detector import config as C
from ioulab.detector.errors import UserError
from ioulab.platform import mlflow_names
from ioulab.platform.sweep import storage
from ioulab.platform.sweep.codecheck import CodeMismatchError, check_working_dir, code_identity
from ioulab.platform.sweep.space import METRICS, Plan

SUMMARY_METRICS = METRICS[:7]  # AP … AP90: the summary table's columns
STATUS_TO_MLFLOW = {"FINISHED": "FINISHED", "FAILED": "FAILED", "STOPPED": "KILLED"}


class SweepError(UserError, RuntimeError):
    """The sweep cannot start (storage, cluster, resume state); the message says what to do."""


@dataclass
class SweepOptions:
    address: str | None = None         # None: $RAY_ADDRESS if set, else an embedded local Ray
    storage: str | None = None         # path or URI; default ./ray_results (embedded only)
    tracking_uri: str | None = None    # default $MLFLOW_TRACKING_URI, else sqlite in the cwd
    experiment: str = "ioulab"
    resume: bool = False
    checkpoint_ref: str | None = None  # plan.checkpoint resolved (checkpoint_source.resolve_checkpoint)
    mlflow_wait: float = 120.0         # seconds the driver keeps retrying MLflow at the end
    verbose: int = 1
    num_cpus: int | None = None        # embedded Ray only
    allow_pending: bool = False        # start even if no node can hold a trial yet (autoscaling)


@dataclass
class TrialRecord:
    stage: str
    index: int
    label: str
    trial_id: str
    status: str                        # FINISHED | FAILED | STOPPED
    values: dict[str, Any]             # the sweep's varying keys → this trial's values
    metrics: dict[str, float]
    node_ids: list[str]
    seconds: float                     # compute time measured inside the trial (last attempt)
    checkpoint: str | None = None      # train: the final checkpoint; eval: what it evaluated
    train_trial_id: str | None = None
    run_id: str | None = None
    error: str | None = None
    pending: list = field(default_factory=list, repr=False)  # MLflow records found in its checkpoint


@dataclass
class SweepOutcome:
    name: str
    sweep_id: str
    experiment_dir: str
    tracking_uri: str
    parent_run_id: str | None
    trials: list[TrialRecord]
    best: TrialRecord | None
    metric: str
    wall_seconds: float
    stage_seconds: dict[str, float]    # Tuner.fit of each stage
    mlflow_complete: bool
    setup_seconds: float = 0.0         # start → the first Tuner.fit (ray.init, data, parent run)
    finalize_seconds: float = 0.0      # MLflow reconciliation and summary

    @property
    def failed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == "FAILED"]


# ----------------------------------------------------------------------------------------------
# Storage and tracking settings
# ----------------------------------------------------------------------------------------------
def cluster_mode(options: SweepOptions) -> bool:
    """True when the sweep runs on an existing cluster (``--address`` or ``$RAY_ADDRESS``)."""
    address = options.address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local"


def storage_root(options: SweepOptions) -> str:
    if options.storage is None:
        if cluster_mode(options):
            raise SweepError("--storage is required on a cluster: an absolute path every node shares "
                             "(NFS) or a URI (s3://..., gs://...); a head-local folder is not enough")
        return str(Path("ray_results").resolve())
    if storage.is_uri(options.storage):
        return options.storage.rstrip("/")
    path = Path(options.storage).expanduser()
    if cluster_mode(options) and not path.is_absolute():
        raise SweepError(f"--storage {options.storage}: give an absolute path on shared storage on a "
                         "cluster (a job's working directory is a temporary copy)")
    return str(path.resolve())


def check_tracking_uri(options: SweepOptions) -> None:
    """The tracking URI rule that needs no MLflow import (so it is checked before Ray starts)."""
    if not options.tracking_uri and cluster_mode(options) and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise SweepError("--tracking-uri is required on a cluster: an MLflow server every node reaches "
                         "(e.g. http://<head>:5000); an SQLite file in the job's working directory "
                         "would be lost")


def tracking_uri(options: SweepOptions) -> str:
    check_tracking_uri(options)
    return mlflow_names.resolve_tracking_uri(options.tracking_uri)


def git_commit(*folders: Path) -> str:
    """The commit of the first folder that is in a git checkout (space file, working directory,
    the installed ioulab code), else ``$IOULAB_GIT_COMMIT``, else "unknown"."""
    for folder in folders:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return os.environ.get("IOULAB_GIT_COMMIT", "unknown")


# ----------------------------------------------------------------------------------------------
# Tune plumbing (module level: the Tuner pickles these and restores them)
# ----------------------------------------------------------------------------------------------
def trial_name(trial) -> str:
    return trial.config["trial"].split(" ", 1)[0]


def trial_dirname(trial) -> str:
    return f"{trial_name(trial)}_{trial.trial_id}"


def _no_retry_on_code_mismatch():
    from ray import tune

    class NoRetryOnCodeMismatch(tune.Callback):
        """A trial that found other ioulab code on its node reports ``code_mismatch`` and then
        raises: it fails without retries (a retry would meet the same code). The retry budget is
        restored once the error is recorded, for a later ``--resume``."""

        def __init__(self):
            self.budgets: dict[str, int] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("code_mismatch") and trial.trial_id not in self.budgets:
                self.budgets[trial.trial_id] = trial.max_failures
                trial.max_failures = 0

        def on_trial_error(self, iteration, trials, trial, **info):
            if trial.trial_id in self.budgets:
                trial.max_failures = self.budgets.pop(trial.trial_id)

    return NoRetryOnCodeMismatch()


def _progress_callback():
    from ray import tune

    class TrialLines(tune.Callback):
        """One line per finished or failed trial (the Tune table stays the detailed view)."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            ap = " ".join(f"{k} {r[k]:.1f}" for k in SUMMARY_METRICS[:2] if isinstance(r.get(k), (int, float)))
            print(f"[ioulab] {trial.config['trial']} done "
                  f"{'(stopped early) ' if not r.get('final') else ''}{ap}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[ioulab] {trial.config['trial']} FAILED", flush=True)

    return TrialLines()


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def _prepare_configs(plan: Plan, local: bool) -> None:
    """Data paths absolute (trials run in their own working folders); on one machine, generate
    the synthetic dataset once here rather than in every trial."""
    from ioulab.detector.data.datasets import absolutize, resolve_paths

    cfg = C.from_dict(plan.train_config, source=f"{plan.space_file} (plan)")
    absolutize(cfg.data)
    plan.train_config = C.to_dict(cfg)
    for key, value in list(plan.eval_overrides.items()):
        if key in ("data.root", "data.train_ann", "data.train_images", "data.val_ann", "data.val_images") and value:
            plan.eval_overrides[key] = str(Path(value).expanduser().resolve())
    if local and plan.checkpoint is None:
        try:
            resolve_paths(C.from_dict(plan.train_config).data)
        except (FileNotFoundError, ValueError) as exc:
            raise SweepError(f"{plan.space_file}: data: {exc}") from None


def _state(root: str, plan: Plan, options: SweepOptions) -> dict:
    path = storage.join(root, "sweep.json")
    text = storage.read_text(path)
    if text is None:
        if options.resume:
            print(f"[ioulab] --resume: no sweep {plan.name} in {root} yet; starting it", flush=True)
        state = {"sweep_id": uuid.uuid4().hex, "name": plan.name, "space_file": str(Path(plan.space_file).resolve()),
                 "profile": plan.profile, "fingerprint": plan.fingerprint(), "parent_run_id": None,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        storage.write_text(path, json.dumps(state, indent=2))
        return state
    state = json.loads(text)
    if not options.resume:
        raise SweepError(f"sweep {plan.name} already exists in {root}: pass --resume to continue it, "
                         "or --name NEW for another sweep")
    if state.get("fingerprint") != plan.fingerprint():
        raise SweepError(f"{plan.space_file} (with these --set/--profile) no longer describes the trials of "
                         f"sweep {plan.name} in {root}; resume with the original file, or start a new "
                         "sweep with --name")
    return state


def _init_ray(options: SweepOptions) -> bool:
    """Connect to (or start) Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if cluster_mode(options):
        ray.init(address=options.address or None, **kwargs)
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=options.num_cpus, **kwargs)
    return True


def resource_shortfall(plan: Plan, nodes: list[dict]) -> str | None:
    """Why no node in ``nodes`` (each node's total resources, ``ray.nodes()[i]["Resources"]``)
    can hold a trial of some stage of ``plan``, or None when every stage fits on some node."""
    for stage, settings, points in (("train", plan.train, plan.train_points), ("eval", plan.eval, plan.eval_points)):
        r = settings.resources
        if not points or any(n.get("CPU", 0) >= r.cpu and n.get("GPU", 0) >= r.gpu for n in nodes):
            continue
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        return (f"{plan.space_file}: a {stage} trial needs {r.cpu:g} CPUs and {r.gpu:g} GPUs on one node; the "
                f"largest node has {biggest.get('CPU', 0):g} CPUs and {biggest.get('GPU', 0):g} GPUs")
    return None


def autoscaler_running() -> bool:
    """True if the connected cluster has an autoscaler that can add nodes: autoscaler v2 is on, or
    the v1 monitor's status (``ray status``) names node types of an autoscaling config. A cluster
    without one (``ray start`` by hand) also runs a monitor, whose node types are only the anonymous
    ``node_<id>`` of each node (Ray's read-only provider)."""
    import ray._private.ray_constants as ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):
            return True
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    except Exception:  # noqa: BLE001 - no answer: treat as a fixed cluster
        return False
    return status is not None and autoscaling_node_types(json.loads(status))


def autoscaling_node_types(status: dict) -> bool:
    """True if the v1 autoscaler status JSON names a node type of an autoscaling config."""
    import re

    report = status.get("autoscaler_report") or {}
    types = {*report.get("active_nodes", {}), *(report.get("idle_nodes") or {}), *report.get("pending_launches", {}),
             *(entry[1] for entry in report.get("pending_nodes", [])),
             *(entry[1] for entry in report.get("failed_nodes", []))}
    return any(not re.fullmatch(r"node_[0-9a-f]+", t) for t in types)


def _check_resources(plan: Plan, allow_pending: bool) -> None:
    """Fail before any trial starts if no node alive now can hold a trial (Tune would wait
    forever for the resources), unless the cluster can grow (``--allow-pending``, or an
    autoscaler): then warn and let the trials wait for the nodes."""
    import ray

    shortfall = resource_shortfall(plan, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
    if shortfall is None:
        return
    if allow_pending or autoscaler_running():
        why = "--allow-pending" if allow_pending else "the cluster autoscales"
        print(f"[ioulab] warning: {shortfall}; its trials wait until such a node joins ({why})",
              file=sys.stderr, flush=True)
        return
    raise SweepError(f"{shortfall} (a CPU profile: --profile cpu; a cluster that adds nodes: --allow-pending)")


def trial_concurrency(settings, cluster: dict[str, float] | None = None) -> int:
    """Trials of a stage at a time: the space's ``concurrency``; for trials of N > 1 workers (which
    reserve only a token CPU themselves) also at most as many as the cluster (``cluster``: Ray's
    total resources, default ``ray.cluster_resources()``) holds worker groups of at once."""
    r = settings.resources
    if r.workers == 1:
        return settings.concurrency
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    groups = cluster.get("CPU", 0) // (r.workers * r.cpu)
    if r.gpu:
        groups = min(groups, cluster.get("GPU", 0) // (r.workers * r.gpu))
    return max(1, min(settings.concurrency, int(groups)))


def _open_parent(plan: Plan, state: dict, uri: str, experiment: str, root: str):
    from ioulab.platform.tracking import MlflowRun

    space = Path(plan.space_file).resolve()
    commit = git_commit(space.parent, Path.cwd(), Path(__file__).resolve().parent)
    tags = mlflow_names.sweep_tags(plan, root, commit)
    spool = Path(root, "mlflow_spool", "parent.jsonl") if not storage.is_uri(root) else None
    parent = MlflowRun(uri, experiment, run_name=plan.name, tags=tags, spool=spool,
                       find_tags=mlflow_names.sweep_key(state["sweep_id"]))
    if parent.reattached and plan.paper is not None:  # --resume: the space file's numbers as they are now
        parent.set_tags({mlflow_names.PAPER: tags[mlflow_names.PAPER]})
    if not parent.reattached:
        fixed = {k: v for k, v in mlflow_names.config_params(C.from_dict(plan.train_config)).items()
                 if k not in plan.varying_keys}
        parent.log_params(fixed)
    return parent


def _context(plan: Plan, state: dict, uri: str, experiment: str, root: str, stage: str, parent_id) -> dict:
    return {"sweep": plan.name, "sweep_id": state["sweep_id"], "experiment": experiment,
            "tracking_uri": uri, "parent_run_id": parent_id, "stage": stage, "stage_dir": storage.join(root, stage),
            "spool_dir": None if storage.is_uri(root) else storage.join(root, "mlflow_spool"),
            "config": plan.train_config, "eval_overrides": plan.eval_overrides}


def _run_stage(stage: str, trainable, points: list[dict], ctx: dict, plan: Plan, root: str,
               resume: bool, callbacks: Iterable, verbose: int):
    from ray import tune

    from ioulab.platform.sweep.trainable import point_name

    settings = plan.train if stage == "train" else plan.eval
    # The driver's code identity travels as a parameter, not in the (restored) param space: a
    # --resume after upgrading the nodes compares them with the driver as it is now.
    fn = tune.with_resources(tune.with_parameters(trainable, driver_code=code_identity().to_json()),
                             settings.resources.as_tune())
    names = {point_name(stage, p): p for p in points}
    ctx = {**ctx, "points": names, "resources": asdict(settings.resources),
           "max_failures": plan.max_failures}
    path = storage.join(root, stage)
    if resume and tune.Tuner.can_restore(path):
        print(f"[ioulab] restoring the {stage} stage from {path}", flush=True)
        tuner = tune.Tuner.restore(path, fn, resume_errored=True)
    else:
        scheduler = None
        if stage == "train" and plan.early_stopping is not None:
            from ray.tune.schedulers import ASHAScheduler

            es = plan.early_stopping
            # stop_last_trials=False: a trial that reaches max_t finishes normally (not "stopped")
            scheduler = ASHAScheduler(time_attr="iteration", metric=plan.metric, mode=plan.mode,
                                      grace_period=es.grace_period, reduction_factor=es.reduction_factor,
                                      max_t=es.max_t, stop_last_trials=False)
        tuner = tune.Tuner(
            fn, param_space={"ioulab": ctx, "trial": tune.grid_search(list(names))},
            # A GPU trial gets a fresh actor: a reused one could keep the last trial's CUDA memory.
            tune_config=tune.TuneConfig(max_concurrent_trials=trial_concurrency(settings),
                                        reuse_actors=settings.resources.gpu == 0,
                                        scheduler=scheduler, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_dirname),
            run_config=tune.RunConfig(
                name=stage, storage_path=root, verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=plan.keep_checkpoints),
                callbacks=[_progress_callback(), _no_retry_on_code_mismatch(), *callbacks]))
    t0 = time.perf_counter()
    grid = tuner.fit()
    return grid, time.perf_counter() - t0


def _checkpoint_ref(checkpoint, root: str) -> tuple[str | None, list]:
    """(reference of the model file in a Tune checkpoint, MLflow records pending in it)."""
    if checkpoint is None:
        return None, []
    import pyarrow.fs

    from ioulab.platform.sweep.trainable import PENDING_FILE

    fs = checkpoint.filesystem
    infos = fs.get_file_info(pyarrow.fs.FileSelector(checkpoint.path))
    models = sorted(i.path for i in infos if i.base_name.startswith("model_") and i.base_name.endswith(".pth"))
    pending: list = []
    if any(i.base_name == PENDING_FILE for i in infos):
        with fs.open_input_stream(f"{checkpoint.path}/{PENDING_FILE}") as f:
            pending = json.loads(f.read().decode() or "[]")
    if not models:
        return None, pending
    if storage.is_uri(root):
        scheme = root.split("://", 1)[0]
        return f"{scheme}://{models[-1]}", pending
    return models[-1], pending


def _kept_metric(name: str) -> bool:
    """What a trial record keeps of the trial's last result (and ``finalize`` logs for a trial
    that never reached MLflow): the AP metrics, losses, the error analysis' ``err/...`` and the
    forward time, not Tune's bookkeeping (``iteration``, ``final``, ``time_total_s``, ...)."""
    return (name in METRICS or mlflow_names.is_loss(name) or mlflow_names.is_error(name)
            or mlflow_names.is_timing(name))


def _records(stage: str, grid, plan: Plan, root: str, values_of) -> list[TrialRecord]:
    from ioulab.platform.sweep.trainable import point_of

    out = []
    for result in grid:
        point = point_of(result.config)
        m = result.metrics or {}
        nodes: list[str] = []
        if result.metrics_dataframe is not None and "node_id" in result.metrics_dataframe:
            nodes = [n for n in dict.fromkeys(result.metrics_dataframe["node_id"].dropna()) if isinstance(n, str)]
        ref, pending = _checkpoint_ref(result.checkpoint, root)
        if stage == "eval":
            ref = point.get("checkpoint")
        status = "FAILED" if result.error is not None else ("FINISHED" if m.get("final") else "STOPPED")
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"[:2000]
        if result.error is not None and m.get("code_mismatch"):
            error = f"CodeMismatchError: {m['code_mismatch']}"
        trial_id = m.get("trial_id") or Path(result.path).name.rsplit("_", 1)[-1]
        metrics = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and _kept_metric(k)}
        out.append(TrialRecord(stage=stage, index=point["index"], label=point["label"], trial_id=trial_id,
                               status=status, values=values_of(stage, point), metrics=metrics, node_ids=nodes,
                               seconds=float(m.get("trial_seconds", m.get("time_total_s", 0.0)) or 0.0),
                               checkpoint=ref, train_trial_id=point.get("train_trial_id"),
                               error=error,
                               pending=pending))
    return sorted(out, key=lambda r: r.index)


def _train_run_ids(uri: str, experiment: str, sweep_id: str) -> dict[str, str]:
    """Trial id → MLflow run id of the sweep's training trials (empty if MLflow is unreachable:
    ``finalize`` sets the evaluations' ``ioulab.train_run_id`` then)."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        where = mlflow_names.tag_filter({mlflow_names.SWEEP_ID: sweep_id, mlflow_names.STAGE: "train"})
        runs = client.search_runs([exp.experiment_id], filter_string=where, max_results=50000) if exp else []
        trial_id = mlflow_names.TRIAL_ID
        return {r.data.tags[trial_id]: r.info.run_id for r in runs if trial_id in r.data.tags}
    except Exception:  # noqa: BLE001 - an outage must not stop the sweep
        return {}


def _preflight(plan: Plan, options: SweepOptions) -> str:
    """The checks that need neither Ray nor MLflow (storage, tracking URI on a cluster, the code a
    job shipped); returns the sweep's folder ``<storage>/<sweep name>``."""
    root = storage.join(storage_root(options), plan.name)
    check_tracking_uri(options)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # ASHA: not every report has AP
    try:
        check_working_dir(Path.cwd())  # ray job submit --working-dir: is the shipped code the imported one?
    except CodeMismatchError as exc:
        raise SweepError(str(exc)) from None
    return root


def _prepare(plan: Plan, options: SweepOptions) -> str:
    """What runs while Ray starts (seconds each): data paths (and synthetic data), the MLflow import
    and store, the trainables' imports (torch, Tune). Returns the tracking URI."""
    _prepare_configs(plan, local=not cluster_mode(options))
    uri = tracking_uri(options)
    import ioulab.platform.tracking  # noqa: F401 - MLflow's fail-fast request settings, before any client
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).get_experiment_by_name(options.experiment)  # creates an SQLite store
    except Exception:  # noqa: BLE001 - unreachable now: the runs are buffered later
        pass
    import ioulab.platform.sweep.trainable  # noqa: F401 - paid here, used after ray.init
    return uri


def _start(plan: Plan, options: SweepOptions):
    """Start Ray while :func:`_prepare` runs in a thread; (True if this call started Ray, the
    future of the tracking URI)."""
    with ThreadPoolExecutor(1) as pool:
        preparing = pool.submit(_prepare, plan, options)
        try:
            owns_ray = _init_ray(options)
        finally:
            preparing.exception()  # never leave it running
    return owns_ray, preparing


def _open_sweep(plan: Plan, options: SweepOptions, root: str, uri: str):
    """Check the cluster can hold the trials, read or create ``sweep.json`` and open the parent
    MLflow run (its id stored in ``sweep.json``); returns (state, parent run)."""
    _check_resources(plan, options.allow_pending)
    state = _state(root, plan, options)
    parent = _open_parent(plan, state, uri, options.experiment, root)
    if parent.run_id and state.get("parent_run_id") != parent.run_id:
        state["parent_run_id"] = parent.run_id
        storage.write_text(storage.join(root, "sweep.json"), json.dumps(state, indent=2))
    print(f"[ioulab] sweep {plan.name}: {len(plan.train_points)} training + {len(plan.eval_points)} "
          f"evaluation trials; Tune storage {root}; MLflow {uri} (experiment {options.experiment}, "
          f"parent run {parent.run_id or 'pending'})", flush=True)
    return state, parent


def _trial_values(plan: Plan, stage: str, point: dict) -> dict:
    """The sweep's varying keys → the values of this trial (an evaluation adds its model's)."""
    overrides = dict(point["overrides"])
    if stage == "eval" and point.get("train_index") is not None:
        overrides = {**plan.train_points[point["train_index"]].overrides, **overrides}
    full = C.from_dict(plan.train_config)
    C.apply_overrides(full, overrides, source="plan")
    flat = C.flatten(full)
    return {k: flat[k] for k in plan.varying_keys}


def _eval_items(plan: Plan, records: list[TrialRecord], train_runs: dict[str, str],
                checkpoint_ref: str | None) -> list[dict]:
    """The evaluation points with the checkpoint each evaluates; points whose model did not
    finish training are left out."""
    by_index = {r.index: r for r in records if r.stage == "train"}
    points = []
    for p in plan.eval_points:
        item = p.to_json()
        if p.train_index is None:
            item["checkpoint"] = checkpoint_ref or plan.checkpoint
        else:
            trained = by_index[p.train_index]
            if trained.checkpoint is None or trained.status != "FINISHED":
                continue  # its model did not finish training: reported by the caller
            item |= {"checkpoint": trained.checkpoint, "train_trial_id": trained.trial_id,
                     "train_run_id": train_runs.get(trained.trial_id)}
        points.append(item)
    return points


def _run_stages(plan: Plan, options: SweepOptions, state: dict, uri: str, root: str,
                callbacks: Iterable) -> tuple[list[TrialRecord], dict[str, float]]:
    """The training stage, then the evaluation stage of the trained (or given) models; returns
    every trial's record and the seconds of each stage's ``Tuner.fit``."""
    from ioulab.platform.sweep import trainable

    values_of = partial(_trial_values, plan)
    context = partial(_context, plan, state, uri, options.experiment, root, parent_id=state.get("parent_run_id"))
    stage = partial(_run_stage, plan=plan, root=root, resume=options.resume, callbacks=callbacks,
                    verbose=options.verbose)
    records: list[TrialRecord] = []
    seconds: dict[str, float] = {}
    if plan.train_points:
        grid, seconds["train"] = stage("train", trainable.train_trial, [p.to_json() for p in plan.train_points],
                                       context("train"))
        records += _records("train", grid, plan, root, values_of)
    if plan.eval_points:
        train_runs = _train_run_ids(uri, options.experiment, state["sweep_id"])
        points = _eval_items(plan, records, train_runs, options.checkpoint_ref)
        if points:
            grid, seconds["eval"] = stage("eval", trainable.eval_trial, points, context("eval"))
            records += _records("eval", grid, plan, root, values_of)
        skipped = len(plan.eval_points) - len(points)
        if skipped:
            print(f"[ioulab] {skipped} evaluations skipped: their training did not finish", file=sys.stderr)
    return records, seconds


def _raise_code_mismatch(records: list[TrialRecord]) -> None:
    """A trial that met other ioulab code on its node fails the sweep with that trial's message."""
    mismatch = next((r.error for r in records if (r.error or "").startswith("CodeMismatchError: ")), None)
    if mismatch:
        raise SweepError(mismatch.removeprefix("CodeMismatchError: "))


def run_sweep(plan: Plan, options: SweepOptions, callbacks: Iterable = ()) -> SweepOutcome:
    """Run (or ``options.resume``) the sweep of ``plan``; blocks until every trial has ended.

    preflight → start Ray (preparing data and MLflow meanwhile) → open the sweep → run the
    stages → finalize (MLflow child runs, summary) → stop the Ray this call started."""
    t_start = time.perf_counter()
    root = _preflight(plan, options)
    owns_ray, preparing = _start(plan, options)
    try:
        uri = preparing.result()
        state, parent = _open_sweep(plan, options, root, uri)
        setup_seconds = time.perf_counter() - t_start
        records, seconds = _run_stages(plan, options, state, uri, root, callbacks)
        from ioulab.platform.sweep.finalize import finalize  # imports MLflow: after Ray has started

        t_final = time.perf_counter()
        best, complete = finalize(plan, state, records, parent, uri, options.experiment, root, options.mlflow_wait)
        t_final = time.perf_counter() - t_final
        _raise_code_mismatch(records)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
    return SweepOutcome(name=plan.name, sweep_id=state["sweep_id"], experiment_dir=root, tracking_uri=uri,
                        parent_run_id=parent.run_id, trials=records, best=best, metric=plan.metric,
                        wall_seconds=time.perf_counter() - t_start, stage_seconds=seconds,
                        mlflow_complete=complete, setup_seconds=setup_seconds, finalize_seconds=t_final)


def outcome_json(outcome: SweepOutcome) -> dict:
    data = asdict(outcome)
    for t in data["trials"]:
        t.pop("pending", None)
    if data["best"]:
        data["best"].pop("pending", None)
    return data


def _fmt(value: Any, metric: bool = False) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else (f"{value:.1f}" if metric else f"{value:g}")
    return str(value)


def summary_markdown(plan: Plan, outcome_trials: list[TrialRecord], best: TrialRecord | None) -> str:
    """The result table: one row per trial of the result stage, the best one in bold."""
    rows = [t for t in outcome_trials if t.stage == plan.result_stage]
    keys = plan.varying_keys
    head = ["trial", *keys, *SUMMARY_METRICS, "status"]
    lines = [f"# sweep {plan.name}", "", f"metric {plan.metric} ({plan.mode}); stage {plan.result_stage}; "
             f"{len(rows)} trials", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in rows:
        cells = [f"{t.stage}-{t.index:03d}", *(_fmt(t.values.get(k)) for k in keys),
                 *(_fmt(t.metrics[k], metric=True) if k in t.metrics else "" for k in SUMMARY_METRICS), t.status]
        if best is not None and t is best:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
