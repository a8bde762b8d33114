"""Space files: schema, validation (errors name the file and the key) and the trial plan. No Ray."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from ioulab.platform.sweep.space import METRICS, SpaceError, load_space

REPO = Path(__file__).resolve().parents[3]
SPACES = REPO / "search_spaces"


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path, **kwargs) -> str:
    with pytest.raises(SpaceError) as info:
        load_space(path, **kwargs)
    return str(info.value)


# -- the shipped files ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in SPACES.glob("*.yaml")))
def test_every_shipped_space_and_profile_validates(name):
    data = yaml.safe_load((SPACES / name).read_text())
    for profile in data.get("profiles") or [None]:
        plan = load_space(SPACES / name, profile=profile)
        assert plan.train_points or plan.eval_points
        assert plan.varying_keys and set(plan.baseline) <= set(plan.varying_keys)


def test_smoke_is_six_cpu_trainings():
    plan = load_space(SPACES / "smoke.yaml")
    assert len(plan.train_points) == 6 and not plan.eval_points  # 2 losses x 3 seeds
    assert plan.train.resources.gpu == 0 and plan.train.concurrency == 2
    losses = sorted({p.overrides["model.roi_heads.box_loss.type"] for p in plan.train_points})
    assert losses == ["giou", "smooth_l1"]


def test_box_loss_couples_weight_12_with_the_iou_family():
    plan = load_space(SPACES / "box_loss.yaml", profile="r50")
    pairs = {(p.overrides["model.roi_heads.box_loss.type"], p.overrides["model.roi_heads.box_loss.weight"])
             for p in plan.train_points}
    assert pairs == {("smooth_l1", 1.0), ("iou", 12.0), ("giou", 12.0), ("diou", 12.0), ("ciou", 12.0)}
    assert plan.train.resources.gpu == 1 and plan.train_config["model"]["backbone"]["name"] == "resnet50"
    # The baseline's variant also fixes the frame (the IoU family's is proposal, as the DIoU code's).
    assert plan.baseline == {"model.roi_heads.box_loss.type": "smooth_l1", "model.roi_heads.box_loss.weight": 1.0,
                             "model.roi_heads.box_loss.frame": "image"}
    cpu = load_space(SPACES / "box_loss.yaml")  # default profile: cpu, seeds from the profile's grid
    assert cpu.profile == "cpu" and len(cpu.train_points) == 15 and "train.seed" in cpu.varying_keys
    assert cpu.name == "box_loss-cpu" and cpu.train_config["model"]["backbone"]["name"] == "tiny"


def test_nms_is_one_training_and_six_evaluations():
    plan = load_space(SPACES / "nms.yaml")
    assert len(plan.train_points) == 1 and len(plan.eval_points) == 6
    assert {p.train_index for p in plan.eval_points} == {0}
    assert all(k.startswith("inference.") for p in plan.eval_points for k in p.overrides)
    assert plan.train_config["model"]["roi_heads"]["box_loss"]["type"] == "ciou"  # the train: stage
    r50 = load_space(SPACES / "nms.yaml", profile="r50")
    assert r50.eval.resources.gpu == 0.25 and r50.train.resources.gpu == 1


def test_metric_names_match_the_evaluator():
    from ioulab.detector.engine.evaluate import METRIC_KEYS

    assert list(METRICS) == METRIC_KEYS


# -- errors name the file and the key -------------------------------------------------------------
def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, """
        base: cpu_tiny
        grdi: {train.seed: [0, 1]}
    """)
    msg = error_of(path)
    assert str(path) in msg and "'grdi'" in msg and "grid" in msg


def test_unknown_config_key_lists_the_nearest(tmp_path):
    path = write(tmp_path, """
        grid: {model.roi_heads.box_los.type: [giou, ciou]}
    """)
    msg = error_of(path)
    assert str(path) in msg and "model.roi_heads.box_los.type" in msg and "model.roi_heads.box_loss.type" in msg


def test_wrong_type(tmp_path):
    path = write(tmp_path, """
        grid: {train.max_iters: [10, ten]}
    """)
    msg = error_of(path)
    assert str(path) in msg and "train.max_iters" in msg and "integer" in msg


def test_value_outside_the_allowed_set(tmp_path):
    path = write(tmp_path, """
        variants:
          - {model.roi_heads.box_loss.type: giou}
          - {model.roi_heads.box_loss.type: eiou}
    """)
    msg = error_of(path)
    assert str(path) in msg and "variants[1]" in msg and "'eiou'" in msg and "ciou" in msg


def test_missing_checkpoint_names_file_and_key(tmp_path):
    from ioulab.platform.sweep.checkpoint_source import resolve_checkpoint

    path = write(tmp_path, f"""
        checkpoint: {tmp_path / 'nope' / 'model_0000010.pth'}
        grid: {{inference.nms.type: [greedy, diou]}}
    """)
    plan = load_space(path)
    with pytest.raises(SpaceError) as info:
        resolve_checkpoint(plan.checkpoint, plan.space_file, f"sqlite:///{tmp_path / 'm.db'}")
    assert str(path) in str(info.value) and "checkpoint" in str(info.value) and "does not exist" in str(info.value)


def test_bad_resources_and_options(tmp_path):
    base = "grid: {train.seed: [0, 1]}\n"
    cases = {"resources: {cpu: -1}": "resources.cpu", "resources: {gpu: 1.5}": "resources.gpu",
             "resources: {tpu: 1}": "'tpu'", "concurrency: 0": "concurrency", "metric: mAP": "metric",
             "mode: up": "mode", "max_failures: two": "max_failures", "train: {set: {inference.nms.type: diou}}":
             "train.set.inference.nms.type", "early_stopping: {type: asha}": "train.eval_period",
             "baseline: {train.lr: 0.1}": "baseline.train.lr", "baseline: {train.seed: 7}": "matches no grid point",
             "set: {train.seed: 3}": "set.train.seed", "grid: {train.seed: []}": "grid.train.seed"}
    for i, (line, needle) in enumerate(cases.items()):
        text = line + "\n" + ("" if line.startswith("grid:") else base)
        msg = error_of(write(tmp_path, text, f"s{i}.yaml"))
        assert f"s{i}.yaml" in msg and needle in msg, (line, msg)


def test_set_overrides_and_conflicts(tmp_path):
    path = write(tmp_path, """
        set: {train.max_iters: 7}
        grid: {train.seed: [0, 1]}
    """)
    plan = load_space(path, ["train.max_iters=3"])
    assert plan.train_config["train"]["max_iters"] == 3  # --set wins over the file
    msg = error_of(path, cli_overrides=["train.seed=4"])
    assert "--set train.seed" in msg and "varies" in msg
    assert "unknown config key" in error_of(path, cli_overrides=["train.max_iter=4"])


def test_profiles(tmp_path):
    path = write(tmp_path, """
        grid: {train.seed: [0, 1]}
        profiles:
          small: {base: cpu_tiny, grid: {train.lr: [0.01, 0.02]}, concurrency: 2}
          big: {base: r50_fpn_1x, resources: {gpu: 0.5}}
    """)
    small = load_space(path)  # the first profile is the default
    assert small.profile == "small" and len(small.train_points) == 4 and small.train.concurrency == 2
    assert small.name == "space-small"
    big = load_space(path, profile="big")
    assert big.train.resources.gpu == 0.5 and len(big.train_points) == 2
    msg = error_of(path, profile="bgi")
    assert "unknown profile 'bgi'" in msg and "big" in msg


# -- stages: eval-only, mixed, given checkpoint ---------------------------------------------------
def test_inference_only_grid_trains_once(tmp_path):
    path = write(tmp_path, """
        grid: {inference.nms.beta: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]}
        set: {inference.nms.type: diou}
    """)
    plan = load_space(path)
    assert len(plan.train_points) == 1 and plan.train_points[0].overrides == {}
    assert len(plan.eval_points) == 6 and plan.result_stage == "eval"
    assert plan.eval_overrides == {"inference.nms.type": "diou"}


def test_mixed_grid_trains_per_training_point_and_evaluates_each_inference_point(tmp_path):
    path = write(tmp_path, """
        grid:
          train.seed: [0, 1]
          inference.nms.type: [greedy, diou]
    """)
    plan = load_space(path)
    assert [p.overrides for p in plan.train_points] == [{"train.seed": 0}, {"train.seed": 1}]
    pairs = sorted((plan.train_points[p.train_index].overrides["train.seed"], p.overrides["inference.nms.type"])
                   for p in plan.eval_points)
    assert pairs == [(0, "diou"), (0, "greedy"), (1, "diou"), (1, "greedy")]


def test_given_checkpoint_evaluates_only(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "model_0000004.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    path = write(tmp_path, f"""
        checkpoint: {tmp_path / 'run'}
        grid: {{inference.nms.type: [greedy, diou]}}
    """)
    plan = load_space(path)
    assert not plan.train_points and len(plan.eval_points) == 2
    assert all(p.train_index is None for p in plan.eval_points)
    from ioulab.platform.sweep.checkpoint_source import resolve_checkpoint

    assert resolve_checkpoint(plan.checkpoint, str(path), "sqlite:///x.db") == str(ckpt)  # newest in run/
    bad = write(tmp_path, f"""
        checkpoint: {ckpt}
        grid: {{inference.nms.type: [greedy, diou], train.seed: [0, 1]}}
    """, "bad.yaml")
    msg = error_of(bad)
    assert "bad.yaml" in msg and "train.seed" in msg and "checkpoint" in msg
    # --checkpoint turns a file with a train: stage into an evaluation of that checkpoint
    plan = load_space(SPACES / "nms.yaml", checkpoint=str(ckpt))
    assert not plan.train_points and len(plan.eval_points) == 6 and plan.checkpoint == str(ckpt)


def test_checkpoint_from_an_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from ioulab.platform.sweep.checkpoint_source import resolve_checkpoint

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    run_dir = tmp_path / "train-run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for it in (2, 4):
        (run_dir / "checkpoints" / f"model_{it:07d}.pth").write_bytes(b"x")
    by_dir = client.create_run(exp, tags={"ioulab.run_dir": str(run_dir)}).info.run_id
    assert resolve_checkpoint(f"mlflow:{by_dir}", "f.yaml", uri) == str(run_dir / "checkpoints" / "model_0000004.pth")
    by_artifact = client.create_run(exp).info.run_id
    client.log_artifact(by_artifact, str(run_dir / "checkpoints" / "model_0000002.pth"), "checkpoints")
    assert resolve_checkpoint(f"mlflow:{by_artifact}", "f.yaml", uri) == f"runs:/{by_artifact}/checkpoints/model_0000002.pth"
    empty = client.create_run(exp).info.run_id
    with pytest.raises(SpaceError, match="no .pth artifact"):
        resolve_checkpoint(f"mlflow:{empty}", "f.yaml", uri)
    with pytest.raises(SpaceError, match="f.yaml: checkpoint: MLflow run 0123 not found"):
        resolve_checkpoint("mlflow:0123", "f.yaml", uri)


def test_iounet_shapes_are_expressible(tmp_path):
    """The IoUNet files (lambda, ablation) use keys the detector does not have yet; these are the
    same shapes with keys it has: a train: stage evaluated over an inference grid, and one trained
    model evaluated in several coupled inference modes."""
    lam = load_space(write(tmp_path, """
        train: {set: {model.roi_pool: prroi_pool}}
        grid: {inference.nms.beta: [0.5, 1.0, 2.0]}
    """, "lam.yaml"))
    assert len(lam.train_points) == 1 and len(lam.eval_points) == 3
    assert lam.train_config["model"]["roi_pool"] == "prroi_pool"
    ablation = load_space(write(tmp_path, """
        train: {set: {model.roi_pool: prroi_pool}}
        variants:
          - {inference.nms.type: greedy}
          - {inference.nms.type: diou, inference.nms.beta: 0.9}
          - {inference.nms.type: diou, inference.nms.beta: 0.9, inference.score_thresh: 0.01}
        baseline: {inference.nms.type: greedy}
    """, "ablation.yaml"))
    assert len(ablation.train_points) == 1 and len(ablation.eval_points) == 3
    assert ablation.varying_keys == ["inference.score_thresh", "inference.nms.type", "inference.nms.beta"]


def test_fingerprint_follows_the_trials(tmp_path):
    a = load_space(write(tmp_path, "grid: {train.seed: [0, 1]}\n", "a.yaml"))
    b = load_space(write(tmp_path, "grid: {train.seed: [0, 1]}\n", "b.yaml"))
    c = load_space(write(tmp_path, "grid: {train.seed: [0, 2]}\n", "c.yaml"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# -- the command fails before Ray starts ---------------------------------------------------------
def test_bad_space_file_fails_fast_without_importing_ray(tmp_path):
    bad = write(tmp_path, """
        base: cpu_tiny
        grid: {model.roi_heads.box_loss.type: [giou, focal]}
    """)
    code = ("import sys; from ioulab.platform.cli import main; rc = main(sys.argv[1:]); "
            "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, "sweep", str(bad)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ))
    elapsed = time.perf_counter() - t0
    assert out.returncode == 2, out.stderr
    assert str(bad) in out.stderr and "model.roi_heads.box_loss.type" in out.stderr and "'focal'" in out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()
    assert elapsed < 30, elapsed  # ray.init alone takes 5-9 s here; validation needs ~2 s


def test_git_commit_falls_back_to_the_environment(tmp_path, monkeypatch):
    from ioulab.platform.sweep.driver import git_commit

    monkeypatch.setenv("IOULAB_GIT_COMMIT", "f" * 40)
    assert git_commit(tmp_path) == "f" * 40  # not a git checkout
    assert git_commit(REPO) != "f" * 40 and len(git_commit(REPO)) == 40


# -- every trial's full config is checked before Ray starts -----------------------------------------
@pytest.mark.parametrize("body, needle", [
    ("grid: {inference.mode: [baseline, refine]}",
     "space.yaml (grid point inference.mode=refine): inference.mode='refine' needs an IoU head, but "
     "model.iou_head.enabled=False (the default)"),
    ("set: {inference.mode: refine}\ngrid: {train.seed: [0, 1]}",
     "space.yaml (set): inference.mode='refine' needs an IoU head"),
    ("set: {inference.mode: refine}\ngrid: {model.iou_head.enabled: [true, false]}",
     "space.yaml (grid point iou_head.enabled=False): inference.mode='refine' needs an IoU head"),
    ("grid: {inference.refine.steps: [3, -1]}", "space.yaml (grid): inference.refine.steps=-1 must be >= 0"),
    ("grid: {train.batch_size: [0, 2]}", "space.yaml (grid): train.batch_size=0 must be >= 1"),
    ("set: {train.lr: .nan}\ngrid: {train.seed: [0, 1]}", "space.yaml (set): train.lr=nan must be a finite number"),
    ("grid: {model.rpn.bg_iou_thresh: [0.3, 0.8]}",
     "space.yaml (grid point rpn.bg_iou_thresh=0.8): model.rpn.fg_iou_thresh=0.7 (the default) must be >= "
     "model.rpn.bg_iou_thresh=0.8 (from"),
    ("grid: {train.eval_period: [0, 3]}",
     "space.yaml (grid point train.eval_period=3): train.eval_period=3 must be a multiple of "
     "train.checkpoint_period=500 (from preset cpu_tiny)"),
])
def test_values_invalid_together_or_at_run_time_fail_the_pre_check(tmp_path, body, needle):
    path = write(tmp_path, "base: cpu_tiny\n" + body + "\n")
    msg = error_of(path)
    assert msg.startswith(str(path.parent) + "/") and needle in msg and "\n" not in msg


def test_a_rule_broken_by_the_base_names_the_space_file_and_point(tmp_path):
    base = write(tmp_path, "base: cpu_tiny\ninference: {mode: refine}\nmodel: {iou_head: {enabled: true}}\n",
                 "base.yaml")
    path = write(tmp_path, "base: base.yaml\ngrid: {model.iou_head.enabled: [true, false]}\n")
    msg = error_of(path)
    assert "inference.mode='refine' needs an IoU head" in msg and "space.yaml" in msg
    assert "iou_head.enabled=False" in msg
    assert base.exists()


def _plain_checkpoint(path):
    """An ioulab checkpoint of a tiny untrained model without an IoU head."""
    from ioulab.detector import config as C
    from ioulab.detector.engine import checkpoint_file as ckpt_io

    cfg = C.load_config("cpu_tiny")
    ckpt_io.save_atomic({"format": ckpt_io.FORMAT, "iteration": 4, "config": C.to_dict(cfg),
                         "dataset": {"num_classes": 1, "label_to_cat_id": [-1, 1], "class_names": ["a"]},
                         "model": {}}, path)
    return path


def test_checkpoint_sweep_checks_the_stored_config_and_the_file(tmp_path):
    from ioulab.platform.sweep.checkpoint_source import check_checkpoint, resolve_checkpoint

    ckpt = _plain_checkpoint(tmp_path / "model_0000004.pth")
    ok = load_space(write(tmp_path, f"checkpoint: {ckpt}\ngrid: {{inference.nms.type: [greedy, diou]}}\n", "ok.yaml"))
    check_checkpoint(ok, resolve_checkpoint(ok.checkpoint, ok.space_file, "sqlite:///x.db"))
    path = write(tmp_path, f"checkpoint: {ckpt}\ngrid: {{inference.mode: [baseline, refine]}}\n")
    plan = load_space(path)  # the space file alone cannot know the checkpoint has no IoU head
    with pytest.raises(SpaceError) as info:
        check_checkpoint(plan, resolve_checkpoint(plan.checkpoint, plan.space_file, "sqlite:///x.db"))
    assert str(info.value) == (f"{path} (grid point inference.mode=refine): inference.mode='refine' needs an IoU head, "
                               f"but model.iou_head.enabled=False (from {ckpt} (stored config)); train with "
                               "model.iou_head.enabled=true, or use inference.mode=baseline")
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    plan = load_space(write(tmp_path, f"checkpoint: {text}\ngrid: {{inference.nms.type: [greedy, diou]}}\n", "t.yaml"))
    with pytest.raises(SpaceError) as info:
        check_checkpoint(plan, resolve_checkpoint(plan.checkpoint, plan.space_file, "sqlite:///x.db"))
    assert str(info.value).startswith(f"{tmp_path / 't.yaml'}: checkpoint: ") and str(text) in str(info.value)


@pytest.mark.parametrize("body", [
    "grid: {{inference.mode: [baseline, refine]}}",
    "set: {{train.lr: .nan}}\ngrid: {{train.seed: [0, 1]}}",
    "checkpoint: {text}\ngrid: {{inference.nms.type: [greedy, diou]}}",
])
def test_dry_run_exits_2_without_ray_or_mlflow(tmp_path, body, monkeypatch, capsys):
    from ioulab.platform.cli import main

    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    path = write(tmp_path, "base: cpu_tiny\n" + body.format(text=text) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("name", ["ablation", "lambda", "roi_generation", "loss_weight"])
def test_iounet_r50_profiles_use_the_reproductions_settings(name):
    """Issue 15: the r50 profiles train and evaluate as the IoUNet reproduction; cpu keeps ioulab's."""
    for profile, want in [("r50", ("reference", "reference", "argmax")), ("cpu", ("uniform", "ioulab", "per_class"))]:
        cfg = load_space(SPACES / f"{name}.yaml", profile=profile).train_config
        head = cfg["model"]["iou_head"]
        assert head["enabled"] is True
        assert (head["roi_generator"]["balance"], head["init"], cfg["inference"]["iou_nms"]["boxes"]) == want
