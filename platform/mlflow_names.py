"""The MLflow naming contract: every tag key the platform writes or reads, the role values, the
metric and param names, the search filters, the tracking-URI fallback, and the tags of each kind
of run, built here once. Writers (the sweep's trainables, driver and finalize, ``ioulab
train`` / ``eval``) and readers (``ioulab report`` / ``compare``, checkpoint lookup) import it.

Parent run of a sweep (``ROLE=sweep``, :func:`sweep_tags`): ``SWEEP`` (name), ``SWEEP_ID``,
``SPACE_FILE``, ``GIT_COMMIT``, ``VARYING_KEYS`` (JSON list), ``BASELINE`` (JSON dict),
``METRIC``, ``MODE``, ``RESULT_STAGE``, ``STORAGE``, ``PROFILE``, ``PAPER`` (JSON, the space file's
``paper:`` block), MLflow's ``NOTE`` (the description); at the end (:func:`summary_tags`)
``ioulab.trials_<status>`` counts and ``BEST_TRIAL_ID`` / ``BEST_RUN_ID`` / ``BEST_LABEL``.
Params: the fixed part of the flattened config; metrics ``best/<metric>`` of the best trial.

Child run of a trial (``ROLE=trial``, :func:`trial_tags`): MLflow's ``PARENT``, ``SWEEP``,
``STAGE`` (train | eval), ``POINT`` (JSON overrides), ``LABEL``, ``POINT_INDEX``,
``TRIAL_STATUS``; found again by :func:`trial_key` (``SWEEP_ID``, Ray's ``TRIAL_ID``); where it
ran (:func:`placement_tags`): ``NODE_ID``, ``RUN_DIR``, ``DEVICE``, ``GPU_IDS``, ``GPU_SHARE``;
``CHECKPOINT``, eval trials ``TRAIN_RUN_ID`` / ``TRAIN_TRIAL_ID``, finalize ``NODE_IDS``.
Params: the flattened config (:func:`config_params`, dotted keys); metrics ``AP``, ``AP50``, ...,
the trainer's ``loss/<name>`` (:func:`is_loss`), ``err/...`` and ``time/infer_ms_per_image``.

Run of a command (:func:`command_tags`): ``COMMAND`` (train | eval), ``RUN_DIR`` (``train
--resume`` finds its run by it), ``CONFIG`` (train), ``CHECKPOINT`` (eval).

No MLflow or Ray import here: the CLI and the sweep's checks read this module before either loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ioulab.detector import config as detector_config

# Keys of MLflow and of Ray that the contract uses.
PARENT = "mlflow.parentRunId"      # MLflow's own nesting tag: works across processes
NOTE = "mlflow.note.content"       # the run's description in the MLflow UI
TRIAL_ID = "ray.trial_id"          # Tune's trial id: a retried or restored trial finds its run
# Experiment tag: which page the MLflow UI (3.x) opens the experiment on; without it MLflow 3.17
# opens the GenAI overview (traces, token usage) instead of the runs table.
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_RUNS = "custom_model_development"
# Experiment tag prefix of a saved view of the UI's runs table (what its "Share" button writes;
# ``#/experiments/<id>/runs?viewStateShareKey=<key>`` opens it): platform/ui_view.py, one per sweep.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."

# Every run
ROLE = "ioulab.role"               # ROLE_SWEEP | ROLE_TRIAL (command runs carry COMMAND instead)
SWEEP = "ioulab.sweep"
SWEEP_ID = "ioulab.sweep_id"
CHECKPOINT = "ioulab.checkpoint"
RUN_DIR = "ioulab.run_dir"
# Parent run of a sweep
SPACE_FILE = "ioulab.space_file"
GIT_COMMIT = "ioulab.git_commit"
VARYING_KEYS = "ioulab.varying_keys"
BASELINE = "ioulab.baseline"
METRIC = "ioulab.metric"
MODE = "ioulab.mode"
RESULT_STAGE = "ioulab.result_stage"
STORAGE = "ioulab.storage"
PROFILE = "ioulab.profile"
PAPER = "ioulab.paper"
BEST_TRIAL_ID = "ioulab.best_trial_id"
BEST_RUN_ID = "ioulab.best_run_id"
BEST_LABEL = "ioulab.best_label"
TRIALS_PREFIX = "ioulab.trials_"    # + finished | failed | stopped: counts
# Child run of a trial
STAGE = "ioulab.stage"
POINT = "ioulab.point"
LABEL = "ioulab.label"
POINT_INDEX = "ioulab.point_index"
TRIAL_STATUS = "ioulab.trial_status"
NODE_ID = "ioulab.node_id"
NODE_IDS = "ioulab.node_ids"
DEVICE = "ioulab.device"
GPU_IDS = "ioulab.gpu_ids"
GPU_SHARE = "ioulab.gpu_share"
TRAIN_RUN_ID = "ioulab.train_run_id"
TRAIN_TRIAL_ID = "ioulab.train_trial_id"
# Run of a command
COMMAND = "ioulab.command"
CONFIG = "ioulab.config"

ROLE_SWEEP, ROLE_TRIAL = "sweep", "trial"
DEFAULT_STAGE = "train"            # a trial run without STAGE (older runs) is a training run

LOSS_PREFIX = "loss/"              # the trainer's loss metrics (detector/engine/train.py): loss/total, ...
# Where the AP goes (detector/engine/erroranalysis.py, every final evaluation): err/<tide type>
# (ΔAP50 if fixed: cls loc both dupe bkg miss), err/n_<tide type> (counts), err/coco_<step>
# (COCO error analysis: c75 c50 loc sim oth bg fn). The detector defines the same prefix.
ERROR_PREFIX = "err/"
# What a trial cost (platform/sweep/cost.py, read by platform/report/cost.py): on each trial run,
# its seconds and the CPU / GPU hours it held (seconds x its Ray resources); on the parent, the totals.
COST_SECONDS = "cost/wall_seconds"
COST_CPU_HOURS = "cost/cpu_hours"
COST_GPU_HOURS = "cost/gpu_hours"
# The model's forward time per image in an evaluation (detector/engine/evaluate.py:predict; every
# final evaluation, eval trial and `ioulab eval`), read by the results table's ms/img column. The
# detector defines the same string (detector/engine/timing.py).
INFER_MS_PER_IMAGE = "time/infer_ms_per_image"
BEST_PREFIX = "best/"              # the parent run's copy of the best trial's metrics

TRACKING_URI_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db)"


# -- tracking URI ------------------------------------------------------------------------------
def absolute_uri(uri: str) -> str:
    """Make ``sqlite:///relative.db`` and bare paths absolute; leave server URIs alone."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    """``$MLFLOW_TRACKING_URI``, else an SQLite file in the working directory, as an absolute URI
    (Ray trials change their working directory: a relative URI would point elsewhere)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return absolute_uri(env)
    return f"sqlite:///{(Path(cwd or os.getcwd()) / 'mlflow.db').resolve()}"


def resolve_tracking_uri(explicit: str | None) -> str:
    """``--tracking-uri`` (made absolute), else :func:`default_tracking_uri`."""
    return absolute_uri(explicit) if explicit else default_tracking_uri()


# -- metrics and params ------------------------------------------------------------------------
def is_loss(metric: str) -> bool:
    return metric.startswith(LOSS_PREFIX)


def is_error(metric: str) -> bool:
    return metric.startswith(ERROR_PREFIX)


def is_timing(metric: str) -> bool:
    return metric == INFER_MS_PER_IMAGE


def experiment_tags() -> dict[str, str]:
    """The tags of the ``ioulab`` experiment (set when it is created, and added to an existing
    one that lacks them): open on the runs table in the MLflow UI."""
    return {EXPERIMENT_KIND: EXPERIMENT_KIND_RUNS}


def best_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The best trial's metrics as the parent run logs them: ``best/<metric>``, losses left out."""
    return {BEST_PREFIX + k: v for k, v in metrics.items() if not is_loss(k)}


def config_params(cfg) -> dict[str, Any]:
    """A run's params: the flattened config, ``{"model.rpn.nms_thresh": 0.7, ...}`` (the trainer
    logs the same, ``detector_config.flatten``)."""
    return detector_config.flatten(cfg)


# -- search filters ----------------------------------------------------------------------------
def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter selecting runs that carry ``tags`` (any values: MLflow's filter
    language has no escape character, so a value is quoted with the quote it does not contain;
    one containing both kinds is matched with LIKE, ``_`` standing for each quote, and the caller
    must check the exact values: :func:`has_tags`)."""
    parts = []
    for key, value in tags.items():
        if "`" in key:
            raise ValueError(f"tag key {key!r} contains a backquote")
        value = str(value)
        if "'" not in value:
            parts.append(f"tags.`{key}` = '{value}'")
        elif '"' not in value:
            parts.append(f'tags.`{key}` = "{value}"')
        else:
            parts.append(f"tags.`{key}` LIKE '{value.replace(chr(39), '_').replace(chr(34), '_')}'")
    return " and ".join(parts)


def has_tags(run, tags: dict[str, str]) -> bool:
    return all(run.data.tags.get(k) == str(v) for k, v in tags.items())


# -- tags of each kind of run ------------------------------------------------------------------
def sweep_key(sweep_id: str) -> dict[str, str]:
    """The tags that find a sweep's parent run again (``--resume``)."""
    return {SWEEP_ID: sweep_id, ROLE: ROLE_SWEEP}


def sweep_tags(plan, storage: str, git_commit: str) -> dict[str, str]:
    """The parent run's tags for ``plan`` (a :class:`~ioulab.platform.sweep.space.Plan`)."""
    tags = {ROLE: ROLE_SWEEP, SWEEP: plan.name, SPACE_FILE: plan.space_file, GIT_COMMIT: git_commit,
            VARYING_KEYS: json.dumps(plan.varying_keys), BASELINE: json.dumps(plan.baseline, default=str),
            METRIC: plan.metric, MODE: plan.mode, RESULT_STAGE: plan.result_stage,
            STORAGE: storage, PROFILE: plan.profile or ""}
    if plan.description:
        tags[NOTE] = plan.description
    if plan.paper is not None:  # read back by platform/report/paper.py
        tags[PAPER] = json.dumps(plan.paper.to_json(), default=str)
    return tags


def summary_tags(counts: dict[str, int], best_trial_id: str | None = None, best_run_id: str | None = None,
                 best_label: str | None = None) -> dict[str, str]:
    """The parent run's tags at the end: trials per status, and the best trial when there is one."""
    tags = {f"{TRIALS_PREFIX}{status.lower()}": str(n) for status, n in counts.items()}
    if best_trial_id is not None:
        tags |= {BEST_TRIAL_ID: best_trial_id, BEST_RUN_ID: best_run_id or "", BEST_LABEL: best_label or ""}
    return tags


def trial_key(sweep_id: str, trial_id: str) -> dict[str, str]:
    """The tags that find a trial's child run again: (sweep id, Tune trial id)."""
    return {SWEEP_ID: sweep_id, TRIAL_ID: trial_id}


def trial_tags(sweep: str, stage: str, *, label: str | None = None, index: int | None = None,
               overrides: dict | None = None, status: str | None = None,
               parent_run_id: str | None = None) -> dict[str, str]:
    """A trial's child-run tags: role, sweep and stage, plus whichever of the grid point (label,
    index, overrides), the trial status and the parent run are given."""
    tags = {ROLE: ROLE_TRIAL, SWEEP: sweep, STAGE: stage}
    if overrides is not None:
        tags[POINT] = json.dumps(overrides, sort_keys=True)
    if label is not None:
        tags[LABEL] = label
    if index is not None:
        tags[POINT_INDEX] = str(index)
    if status is not None:
        tags[TRIAL_STATUS] = status
    if parent_run_id:
        tags[PARENT] = parent_run_id
    return tags


def status_tag(status: str) -> dict[str, str]:
    """A trial's status as its run shows it: RUNNING, then FINISHED | FAILED | STOPPED."""
    return {TRIAL_STATUS: status}


def placement_tags(node_id: str, device: str, gpu_ids: str, gpu_share: float) -> dict[str, str]:
    """Where a trial runs: its Ray node, torch device and the GPUs (share) Ray gave it."""
    return {NODE_ID: node_id, DEVICE: device, GPU_IDS: gpu_ids, GPU_SHARE: f"{gpu_share:g}"}


def command_tags(command: str, run_dir: str | None = None, config: str | None = None,
                 checkpoint: str | None = None) -> dict[str, str]:
    """The tags of an ``ioulab train`` / ``ioulab eval`` run."""
    tags = {RUN_DIR: run_dir, COMMAND: command, CONFIG: config, CHECKPOINT: checkpoint}
    return {k: v for k, v in tags.items() if v is not None}
