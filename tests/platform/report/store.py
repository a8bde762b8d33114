"""Handmade MLflow stores that follow the sweep's naming contract (DESIGN.md, platform/report/runs.py).

Parent run per sweep (tags ``ioulab.role=sweep``, ``ioulab.sweep``, ``ioulab.varying_keys``,
``ioulab.baseline``...), child run per trial (``mlflow.parentRunId``, ``ioulab.role=trial``,
``ray.trial_id``, ``ioulab.stage``, ``ioulab.trial_status``), params = the full flattened config as
strings, metrics ``AP``... in percent and ``loss/<name>`` per step.
"""
from __future__ import annotations

import json
import time

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ioulab.detector import config as C

BASE_PARAMS = {k: str(v) for k, v in C.flatten(C.load_config("cpu_tiny", [])).items()}
# Keys the sweep's later configs add (the refinement step, IoU head loss) are strings like the rest.
BASE_PARAMS.update({"inference.refine.lam": "0.5", "inference.refine.steps": "5",
                    "model.iou_head.loss.type": "smooth_l1"})
RUN_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "STOPPED": "KILLED"}


class SweepStore:
    def __init__(self, tmp_path):
        self.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.artifacts = tmp_path / "artifacts"
        self.client = MlflowClient(self.uri)
        self.exp = self.client.create_experiment("ioulab-sweeps",
                                                 artifact_location=self.artifacts.as_uri())
        self._clock = int(time.time() * 1000)

    def _tick(self) -> int:
        self._clock += 1000
        return self._clock

    def parent(self, name: str, varying: list[str], baseline: dict | None = None,
               tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.exp, run_name=name, start_time=self._tick(), tags={
            "ioulab.role": "sweep", "ioulab.sweep": name, "ioulab.space_file": f"search_spaces/{name}.yaml",
            "ioulab.git_commit": "fb2e192", "ioulab.varying_keys": json.dumps(varying),
            "ioulab.baseline": json.dumps(baseline or {}), **(tags or {})})
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def trial(self, parent: str, sweep: str, trial_id: str, overrides: dict, metrics: dict | None,
              status: str = "FINISHED", stage: str = "train", train_run_id: str | None = None) -> str:
        tags = {"mlflow.parentRunId": parent, "ioulab.role": "trial", "ioulab.sweep": sweep,
                "ray.trial_id": trial_id, "ioulab.stage": stage, "ioulab.trial_status": status}
        if train_run_id:
            tags["ioulab.train_run_id"] = train_run_id
        run = self.client.create_run(self.exp, run_name=trial_id, start_time=self._tick(), tags=tags)
        rid = run.info.run_id
        params = dict(BASE_PARAMS, **{k: str(v) for k, v in overrides.items()})
        now = self._tick()
        losses = [Metric("loss/total", 2.0 / (s + 1), now, s) for s in range(3)] if stage == "train" else []
        ms = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        self.client.log_batch(rid, params=[Param(k, v) for k, v in params.items()], metrics=losses + ms,
                              tags=[RunTag("ioulab.config", "cpu_tiny")])
        self.client.set_terminated(rid, RUN_STATUS[status])
        return rid

    def single_run(self, experiment: str, overrides: dict, metrics: dict) -> str:
        """A plain `ioulab train` run: no sweep tags."""
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            experiment, artifact_location=(self.artifacts / experiment).as_uri())
        run = self.client.create_run(exp_id, run_name="train-single", tags={"ioulab.command": "train"})
        params = dict(BASE_PARAMS, **{k: str(v) for k, v in overrides.items()})
        self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                              metrics=[Metric(k, float(v), self._tick(), 0) for k, v in metrics.items()])
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id


def ap(AP, AP50, AP60, AP70, AP80, AP90, AP75=None):
    out = {"AP": AP, "AP50": AP50, "AP60": AP60, "AP70": AP70, "AP80": AP80, "AP90": AP90}
    out["AP75"] = AP75 if AP75 is not None else (AP70 + AP80) / 2
    out.update({"APs": AP - 10, "APm": AP, "APl": AP + 10})
    return out


def matched_variants(folder) -> dict[str, list[tuple[dict, object]]]:
    """{box loss: [(metrics, path of eval_matches.npz) per seed]} from the synthetic bench set."""
    import numpy as np

    from ioulab.detector.engine import cocoeval
    from ioulab.platform.bench.eval import synthetic_eval_set

    gt, dets, _ = synthetic_eval_set(80, 6, 30, seed=11)
    half = {img["id"] for img in gt["images"][:40]}
    oracle = [d for d in dets if d["image_id"] not in half] + [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"] if a["image_id"] in half]
    out = {}
    for loss, base in (("smooth_l1", dets), ("giou", dets), ("ciou", oracle)):
        out[loss] = []
        for seed in range(3):
            rng = np.random.default_rng([seed, len(out)])
            noisy = [{**d, "score": float(np.clip(d["score"] + rng.normal(0, 0.05), 0.001, 1))} for d in base]
            path = folder / f"{loss}_{seed}" / "eval_matches.npz"
            path.parent.mkdir()
            cocoeval.match(gt, [dict(d) for d in noisy]).save(path)
            out[loss].append((cocoeval.evaluate(gt, noisy), path))
    return out
