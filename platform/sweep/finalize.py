"""The end of a sweep, on the driver: every trial gets exactly one MLflow child run carrying its
final status, the parent run gets the best trial and the summary. Idempotent (``--resume`` of a
finished sweep runs it again) and patient: MLflow is retried for ``wait`` seconds, and whatever
still cannot be delivered is spooled with the command that replays it.

Steps: replay the records the trials spooled (``<storage>/<sweep>/mlflow_spool``) → find the child
runs by (sweep id, trial id); create the run of a trial that never reached MLflow → replay the
records found in each trial's last checkpoint → set ``ioulab.trial_status`` / run status (a trial
ASHA stopped: STOPPED / KILLED), ``mlflow.parentRunId``, ``ioulab.checkpoint`` (training trials) and
``ioulab.train_run_id`` (evaluations) → summary.md / summary.json, best trial, close the parent.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ioulab.detector import config as C
from ioulab.platform.sweep import cost, storage
from ioulab.platform.sweep.driver import STATUS_TO_MLFLOW, TrialRecord, summary_markdown
from ioulab.platform.sweep.space import Plan
from ioulab.platform import mlflow_names
from ioulab.platform.tracking import MlflowRun, SpoolError, replay_file


def best_trial(plan: Plan, records: list[TrialRecord]) -> TrialRecord | None:
    """The best trial of the result stage by the sweep's metric; trials that ran to the end win
    over trials early stopping cut short (their metric is from an earlier evaluation)."""
    scored = [t for t in records if t.stage == plan.result_stage and t.status != "FAILED"
              and isinstance(t.metrics.get(plan.metric), float) and not math.isnan(t.metrics[plan.metric])]
    scored = [t for t in scored if t.status == "FINISHED"] or scored
    if not scored:
        return None
    pick = max if plan.mode == "max" else min
    return pick(scored, key=lambda t: t.metrics[plan.metric])


def _replay_spools(root: str, uri: str, deadline: float) -> bool:
    """Replay ``<root>/mlflow_spool/*.jsonl`` to ``uri`` only, uploading only files under ``root``:
    anyone who can write the storage can write a spool file, so a file naming another server or
    outside files is refused (reported, left in place) instead of obeyed."""
    if storage.is_uri(root):
        return True
    folder = Path(root, "mlflow_spool")
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    refused = []
    while files:
        left = []
        for f in files:
            try:
                pending = replay_file(f, uri, root=root)
            except SpoolError as exc:
                print(f"[ioulab] warning: spool file refused: {exc}", file=sys.stderr)
                refused.append(f)
                continue
            if pending == 0:
                f.unlink()
                shutil.rmtree(f.with_suffix(".files"), ignore_errors=True)
            else:
                left.append(f)
        files = left
        if not files or time.monotonic() >= deadline:
            break
        time.sleep(2.0)
    if files:
        print(f"[ioulab] {len(files)} spooled MLflow record files not delivered yet: replay with "
              + "; ".join(f"python -m ioulab.platform.tracking {f} --tracking-uri {uri}" for f in files),
              file=sys.stderr)
    return not files and not refused


def _trial_params(plan: Plan, record: TrialRecord) -> dict:
    cfg = C.from_dict(plan.train_config)
    C.apply_overrides(cfg, record.values, source="plan")
    return mlflow_names.config_params(cfg)


def _trial_runs(uri: str, experiment: str, sweep_id: str) -> dict[str, list]:
    """Trial id → the sweep's MLflow child runs of that trial, oldest first (raises if MLflow
    cannot be read)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = []
    if exp is not None:
        where = mlflow_names.tag_filter({mlflow_names.SWEEP_ID: sweep_id, mlflow_names.ROLE: mlflow_names.ROLE_TRIAL})
        runs = client.search_runs([exp.experiment_id], filter_string=where, max_results=50000,
                                  order_by=["attributes.start_time ASC"])
    by_trial: dict[str, list] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags.get(mlflow_names.TRIAL_ID, ""), []).append(run)
    return by_trial


def _trial_writer(plan: Plan, state: dict, rec: TrialRecord, found: list, uri: str,
                  experiment: str) -> tuple[MlflowRun, dict[str, str], str | None]:
    """The trial's run to write to (the first of ``found``, else a new one with its params and
    last metrics: the trial never reached MLflow) with the records its checkpoint held requeued;
    returns (writer, the run's tags now, its status now)."""
    if len(found) > 1:
        print(f"[ioulab] warning: trial {rec.trial_id} has {len(found)} MLflow runs "
              f"({', '.join(r.info.run_id for r in found)}); using the first", file=sys.stderr)
    if found:
        run = found[0]
        rec.run_id = run.info.run_id
        tags, status = run.data.tags, run.info.status
        writer = MlflowRun(uri, experiment, run_id=rec.run_id, connect=False)
    else:  # the trial never reached MLflow (e.g. it failed while the server was down)
        tags, status = {}, None
        writer = MlflowRun(uri, experiment, run_name=f"{rec.stage}-{rec.index:03d} {rec.label}",
                           tags=mlflow_names.trial_tags(plan.name, rec.stage, label=rec.label, index=rec.index),
                           find_tags=mlflow_names.trial_key(state["sweep_id"], rec.trial_id))
        rec.run_id = writer.run_id
        writer.log_params(_trial_params(plan, rec))
        if rec.metrics:
            writer.log_metrics(rec.metrics, 0)
    if rec.pending:
        writer.requeue(rec.pending)
    writer.log_metrics(cost.record_cost(plan, rec), 0)
    return writer, tags, status


def _final_tags(plan: Plan, rec: TrialRecord, parent_id: str | None, train_runs: dict[str, str]) -> dict[str, str]:
    """The tags a trial's run ends with: status, parent, checkpoint, training run, nodes."""
    want = mlflow_names.trial_tags(plan.name, rec.stage, status=rec.status, parent_run_id=parent_id)
    if rec.checkpoint:
        want[mlflow_names.CHECKPOINT] = rec.checkpoint
    if rec.stage == "eval" and rec.train_trial_id and train_runs.get(rec.train_trial_id):
        want[mlflow_names.TRAIN_RUN_ID] = train_runs[rec.train_trial_id]
    if rec.node_ids:
        want[mlflow_names.NODE_IDS] = json.dumps(rec.node_ids)
    return want


def _reconcile(plan: Plan, state: dict, records: list[TrialRecord], parent_id: str | None, uri: str,
               experiment: str, deadline: float) -> bool:
    """One pass: every trial gets exactly one run with its final tags and status; raises if MLflow
    cannot be read (the caller retries). True when everything was delivered."""
    by_trial = _trial_runs(uri, experiment, state["sweep_id"])
    writers = [(rec, *_trial_writer(plan, state, rec, by_trial.get(rec.trial_id, []), uri, experiment))
               for rec in records]
    train_runs = {r.trial_id: r.run_id for r in records if r.stage == "train"}
    complete = True
    for rec, writer, tags, status in writers:
        want = _final_tags(plan, rec, parent_id, train_runs)
        # After replayed records (which may carry older tags), the final word on every tag.
        changed = want if rec.pending else {k: v for k, v in want.items() if tags.get(k) != v}
        if changed:
            writer.set_tags(changed)
        if status != STATUS_TO_MLFLOW[rec.status]:
            writer.close(STATUS_TO_MLFLOW[rec.status])
        complete &= writer.deliver(max(0.0, deadline - time.monotonic()))
    return complete


def finalize(plan: Plan, state: dict, records: list[TrialRecord], parent: MlflowRun, uri: str,
             experiment: str, root: str, wait: float) -> tuple[TrialRecord | None, bool]:
    deadline = time.monotonic() + wait
    complete = _replay_spools(root, uri, deadline)
    while True:
        try:
            parent.deliver(0)
            complete &= _reconcile(plan, state, records, parent.run_id, uri, experiment, deadline)
            break
        except Exception as exc:  # MLflow unreachable: retry until the deadline
            if time.monotonic() >= deadline:
                print(f"[ioulab] MLflow at {uri} unreachable ({type(exc).__name__}); trial runs not "
                      f"finalized: run `ioulab sweep {plan.space_file} --resume` (same options) once it is back",
                      file=sys.stderr)
                complete = False
                break
            time.sleep(2.0)

    best = best_trial(plan, records)
    summary = {"sweep": plan.name, "sweep_id": state["sweep_id"], "space_file": plan.space_file,
               "metric": plan.metric, "mode": plan.mode, "result_stage": plan.result_stage,
               "varying_keys": plan.varying_keys, "baseline": plan.baseline,
               "best": None if best is None else {"trial_id": best.trial_id, "run_id": best.run_id,
                                                  "label": best.label, plan.metric: best.metrics.get(plan.metric)},
               "trials": [{"stage": t.stage, "index": t.index, "label": t.label, "trial_id": t.trial_id,
                           "run_id": t.run_id, "status": t.status, "values": t.values, "metrics": t.metrics,
                           "node_ids": t.node_ids, "seconds": t.seconds, "checkpoint": t.checkpoint,
                           "train_trial_id": t.train_trial_id, "error": t.error} for t in records]}
    folder = Path(root) if not storage.is_uri(root) else Path(tempfile.mkdtemp(prefix="ioulab-summary-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (folder / "summary.md").write_text(summary_markdown(plan, records, best))
    (folder / "space.yaml").write_text(plan.source_text)
    if storage.is_uri(root):
        for name in ("summary.json", "summary.md"):
            storage.write_text(storage.join(root, name), (folder / name).read_text())

    for name in ("summary.md", "summary.json", "space.yaml"):
        parent.log_artifact(folder / name)
    counts = {s: sum(t.status == s for t in records) for s in ("FINISHED", "FAILED", "STOPPED")}
    if best is None:
        tags = mlflow_names.summary_tags(counts)
    else:
        tags = mlflow_names.summary_tags(counts, best.trial_id, best.run_id, best.label)
        parent.log_metrics(mlflow_names.best_metrics(best.metrics), 0)
    parent.log_metrics(cost.sweep_total(plan, records), 0)
    parent.set_tags(tags)
    parent.deliver(max(0.0, deadline - time.monotonic()))
    complete &= parent.close("FINISHED")
    return best, complete
