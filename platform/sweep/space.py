"""Search space files (``search_spaces/*.yaml``): schema, validation and the trial plan.

A space file names a base config, the grid as dotted config keys, resources per trial, the metric
and the concurrency. This module reads it, checks everything before Ray starts (errors name the
file and the key), and expands it into a :class:`Plan`: the training trials and the evaluation
trials of the sweep. It imports neither Ray, MLflow nor torch.

Schema (every key optional except a grid or variants)::

    name: box_loss                     # sweep name (default: the file name)
    description: text
    base: cpu_tiny                     # preset or config YAML (relative to this file)
    set: {train.max_iters: 500}        # fixed overrides of every trial
    grid:                              # cartesian product of dotted keys
      train.seed: [0, 1]
    variants:                          # coupled values: one list entry per point, crossed with grid
      - {model.roi_heads.box_loss.type: smooth_l1}
      - {model.roi_heads.box_loss.type: giou, model.roi_heads.box_loss.weight: 12.0}
    baseline: {model.roi_heads.box_loss.type: smooth_l1}   # default: the first point
    metric: AP                         # AP AP50 ... APl; mode: max | min
    resources: {cpu: 1, gpu: 0}        # per trial; fractional GPUs allowed; workers: N (training
                                       # only): N DDP workers per trial, cpu/gpu per worker
    concurrency: 2                     # trials at a time
    max_failures: 2                    # retries of a trial (node loss, crash) from its checkpoint
    early_stopping: {type: asha, grace_period: 200, reduction_factor: 2}   # needs train.eval_period
    checkpoint: runs/x/checkpoints/model_0001000.pth    # or mlflow:<run id>: evaluate, train nothing
                                       # (--checkpoint on the command line: the same, train: ignored)
    train: {set: {...}, resources: {...}, concurrency: N}   # the training stage only
    eval: {resources: {...}, concurrency: N}                # the evaluation stage only
    profiles: {cpu: {...}, r50: {...}} # named overrides of the keys above; --profile NAME
                                       # (set and grid merge key by key, the rest replaces)
    default_profile: cpu
    paper:                             # the paper's published numbers for rows of this sweep
      source: "IoUNet reproduction, ablation"   # shown by ``ioulab report`` beside ours
      rows:                            # variant: varying keys naming one variant (seeds aside);
        - {variant: {inference.mode: baseline}, AP: 37.8}         # metrics in percent, and/or
        - {variant: {inference.refine.lam: 2.0}, delta: {AP: 0.1}}  # the published Δ vs baseline

Stages. ``inference.*`` keys change no weights. Every grid point is split into its training part
(all other keys) and its inference part. With ``checkpoint:`` nothing is trained and every point
is one evaluation of that checkpoint. Otherwise each distinct training part is trained once; if any
point has an inference part, every point is then one evaluation of the model of its training part
(a grid of 6 ``inference.*`` values = one training + six evaluations).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from ioulab.detector import config as C
from ioulab.detector.errors import UserError

# The keys of detector.engine.evaluate.METRIC_KEYS (not imported: that module imports torch and
# validation must stay fast; a test checks that both lists agree).
METRICS = ("AP", "AP50", "AP60", "AP70", "AP75", "AP80", "AP90", "APs", "APm", "APl")
INFERENCE_PREFIX = "inference."
MLFLOW_PREFIX = "mlflow:"

TOP_KEYS = ("name", "description", "base", "set", "grid", "variants", "baseline", "metric", "mode",
            "resources", "concurrency", "max_failures", "early_stopping", "checkpoint", "train",
            "eval", "profiles", "default_profile", "keep_checkpoints", "paper")
PROFILE_KEYS = ("base", "set", "grid", "variants", "baseline", "resources", "concurrency", "max_failures",
                "early_stopping", "checkpoint", "train", "eval", "description", "keep_checkpoints")
STAGE_KEYS = {"train": ("set", "resources", "concurrency"), "eval": ("resources", "concurrency")}
RESOURCE_KEYS = ("cpu", "gpu", "workers")
EARLY_STOPPING_KEYS = ("type", "grace_period", "reduction_factor", "max_t")
PAPER_KEYS = ("source", "rows")
PAPER_ROW_KEYS = ("variant", "delta", *METRICS)
PAPER_TAG_LIMIT = 8000  # MLflow's longest tag value (the block travels as the tag ioulab.paper)


class SpaceError(UserError, ValueError):
    """The space file is invalid; the message names the file and the key."""


# What a trial of N > 1 workers reserves itself: Ray refuses a zero-resource trial ("empty head and
# zero worker bundles"); its workers reserve the real resources (platform/sweep/ddp_trial.py), so
# the trial never holds a GPU while its workers wait for theirs.
DDP_TRIAL_CPU = 0.01


@dataclass
class Resources:
    """Per worker; ``workers`` > 1: one trial is that many DDP workers (Ray Train)."""

    cpu: float = 1.0
    gpu: float = 0.0
    workers: int = 1

    def as_tune(self) -> dict[str, float]:
        if self.workers > 1:
            return {"cpu": DDP_TRIAL_CPU, "gpu": 0}
        return {"cpu": self.cpu, "gpu": self.gpu}


@dataclass
class StageSettings:
    resources: Resources
    concurrency: int


@dataclass
class EarlyStopping:
    """ASHA on the validation metric; ``time`` is the training iteration."""

    grace_period: int
    reduction_factor: float
    max_t: int


@dataclass
class Point:
    """One trial: ``overrides`` are the dotted keys this trial sets on top of the fixed config."""

    index: int
    overrides: dict[str, Any]
    label: str

    def to_json(self) -> dict:
        return {"index": self.index, "overrides": self.overrides, "label": self.label}


@dataclass
class EvalPoint(Point):
    train_index: int | None = None  # index into Plan.train_points, None: the given checkpoint

    def to_json(self) -> dict:
        return super().to_json() | {"train_index": self.train_index}


@dataclass
class PaperRow:
    """The paper's numbers for one variant: ``values`` (metric -> percent) and/or ``delta``
    (metric -> the published difference to the sweep's baseline, in points)."""

    variant: dict[str, Any]
    values: dict[str, float]
    delta: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"variant": self.variant, **self.values, **({"delta": self.delta} if self.delta else {})}


@dataclass
class Paper:
    """The space file's ``paper:`` block: published numbers to print beside the sweep's own."""

    source: str
    rows: list[PaperRow]

    def to_json(self) -> dict:
        return {"source": self.source, "rows": [r.to_json() for r in self.rows]}


@dataclass
class Plan:
    """What a sweep runs. ``train_config`` is the fixed config of every trial (base + set + --set +
    the training stage's ``set``) as a dict (``config.to_dict``); points add their overrides to it."""

    name: str
    space_file: str
    profile: str | None
    train_config: dict
    train_points: list[Point]
    eval_points: list[EvalPoint]
    eval_overrides: dict[str, Any]   # fixed non-model/non-train overrides applied when evaluating
    checkpoint: str | None           # the given checkpoint source (path or mlflow:<id>)
    metric: str
    mode: str
    train: StageSettings
    eval: StageSettings
    max_failures: int
    keep_checkpoints: int
    early_stopping: EarlyStopping | None
    varying_keys: list[str]
    baseline: dict[str, Any]
    description: str = ""
    source_text: str = field(default="", repr=False)
    paper: Paper | None = None       # not part of the fingerprint: it changes no trial

    @property
    def result_stage(self) -> str:
        """The stage whose trials hold the sweep's results."""
        return "eval" if self.eval_points else "train"

    def fingerprint(self) -> str:
        """Changes whenever the trials of the plan would change (checked by ``--resume``)."""
        payload = {"train_config": self.train_config, "eval_overrides": self.eval_overrides,
                   "train": [p.to_json() for p in self.train_points],
                   "eval": [p.to_json() for p in self.eval_points], "checkpoint": self.checkpoint}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Reading and checking
# ----------------------------------------------------------------------------------------------
def _near(word: str, options) -> str:
    near = difflib.get_close_matches(word, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(near)}?" if near else f" (allowed: {', '.join(options)})"


def _check_keys(data: Mapping, allowed, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise SpaceError(f"{where}: unknown key {key!r}{_near(str(key), allowed)}")


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpaceError(f"{where} must be a mapping, got {value!r}")
    return dict(value)


def _number(value: Any, where: str, minimum: float, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{where} must be a number, got {value!r}")
    if value < minimum or (not inclusive and value == minimum):
        raise SpaceError(f"{where} must be {'>=' if inclusive else '>'} {minimum}, got {value!r}")
    return float(value)


def _integer(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpaceError(f"{where} must be an integer, got {value!r}")
    if value < minimum:
        raise SpaceError(f"{where} must be >= {minimum}, got {value!r}")
    return value


def _resources(value: Any, where: str, default: Resources) -> Resources:
    data = _mapping(value, where)
    _check_keys(data, RESOURCE_KEYS, where)
    cpu = _number(data.get("cpu", default.cpu), f"{where}.cpu", 0, inclusive=False)
    gpu = _number(data.get("gpu", default.gpu), f"{where}.gpu", 0)
    if gpu > 1 and not float(gpu).is_integer():
        raise SpaceError(f"{where}.gpu: fractions are only allowed below 1 GPU, got {gpu!r}")
    return Resources(cpu, gpu, _integer(data.get("workers", default.workers), f"{where}.workers", 1))


def _stage_resources(stage: str, body: dict, inherited: Resources, where: str) -> Resources:
    """The resources of ``stage`` (its own ``resources``, else the top level's). ``workers`` is for
    training: an evaluation runs in one process (inherited workers do not apply to it)."""
    if stage == "eval":
        inherited = replace(inherited, workers=1)
    if "resources" not in body:
        return inherited
    resources = _resources(body["resources"], f"{where}: {stage}.resources", inherited)
    if stage == "eval" and resources.workers > 1:
        raise SpaceError(f"{where}: eval.resources.workers: an evaluation trial runs in one process; "
                         f"give workers: {resources.workers} under train.resources instead")
    return resources


def _overrides(value: Any, where: str) -> dict[str, Any]:
    """A mapping of dotted config keys (a nested section is flattened)."""
    out: dict[str, Any] = {}

    def walk(data: Mapping, prefix: str) -> None:
        for key, item in data.items():
            if not isinstance(key, str):
                raise SpaceError(f"{where}: keys must be dotted config keys, got {key!r}")
            if isinstance(item, Mapping):
                walk(item, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = item

    walk(_mapping(value, where), "")
    return out


def _apply(cfg: C.Config, overrides: Mapping[str, Any], source: str) -> None:
    try:
        C.apply_overrides(cfg, dict(overrides), source=source)
    except C.ConfigError as exc:
        raise SpaceError(str(exc)) from None


def check_trial_config(cfg: C.Config, where: str, label: str) -> None:
    """The whole config of one trial, checked as ``ioulab train``/``eval`` check it (ranges and
    the rules between keys), so that nothing invalid only in combination reaches Ray."""
    try:
        C.validate(cfg)
    except C.ConfigError as exc:
        message = str(exc)
        if where not in message:
            message += f" (in {where}, grid point {label})"
        raise SpaceError(message) from None


def is_inference_key(key: str) -> bool:
    return key.startswith(INFERENCE_PREFIX)


def _merge_profile(data: dict, profile: str | None, where: str) -> tuple[dict, str | None]:
    profiles = _mapping(data.pop("profiles", None), f"{where}: profiles")
    default = data.pop("default_profile", None)
    if not profiles:
        if profile is not None:
            raise SpaceError(f"{where}: --profile {profile!r} given but the file defines no profiles")
        if default is not None:
            raise SpaceError(f"{where}: default_profile without profiles")
        return data, None
    if default is not None and default not in profiles:
        raise SpaceError(f"{where}: default_profile {default!r} is not a profile{_near(str(default), profiles)}")
    chosen = profile or default or next(iter(profiles))
    if chosen not in profiles:
        raise SpaceError(f"{where}: unknown profile {chosen!r}{_near(chosen, profiles)}")
    body = _mapping(profiles[chosen], f"{where}: profiles.{chosen}")
    _check_keys(body, PROFILE_KEYS, f"{where}: profiles.{chosen}")
    merged = dict(data)
    for key, value in body.items():
        if key == "set":  # a profile's set adds to (and wins over) the common set
            merged["set"] = {**_overrides(data.get("set"), f"{where}: set"),
                             **_overrides(value, f"{where}: profiles.{chosen}.set")}
        elif key == "grid":  # a profile's grid adds keys to (or replaces keys of) the common grid
            merged["grid"] = {**_mapping(data.get("grid"), f"{where}: grid"),
                              **_mapping(value, f"{where}: profiles.{chosen}.grid")}
        elif key in ("train", "eval") and isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
            stage = dict(data[key])
            for sub, sub_value in value.items():
                if sub == "set":
                    stage["set"] = {**_overrides(stage.get("set"), f"{where}: {key}.set"),
                                    **_overrides(sub_value, f"{where}: profiles.{chosen}.{key}.set")}
                else:
                    stage[sub] = sub_value
            merged[key] = stage
        else:
            merged[key] = value
    return merged, chosen


def _points(grid: dict[str, list], variants: list[dict]) -> list[dict[str, Any]]:
    """Variants (outer) × the cartesian product of the grid keys in file order."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    return [{**variant, **combo} for variant in (variants or [{}]) for combo in combos]


def _short(key: str) -> str:
    return ".".join(key.split(".")[-2:])


def _label(values: Mapping[str, Any]) -> str:
    return ",".join(f"{_short(k)}={v}" for k, v in values.items()) or "default"


def _unique(parts: list[dict]) -> list[dict]:
    seen: list[dict] = []
    for part in parts:
        if part not in seen:
            seen.append(part)
    return seen


def _percent(value: Any, where: str, minimum: float) -> float:
    number = _number(value, where, minimum)
    if number > 100:
        raise SpaceError(f"{where} must be <= 100 (percent), got {value!r}")
    return number


def _paper_variant(raw: Any, where: str, cfg: C.Config, varying: list[str]) -> dict[str, Any]:
    """A paper row's ``variant``: varying keys, with their values typed as the config types them."""
    variant = _overrides(raw, f"{where}.variant")
    if not variant:
        raise SpaceError(f"{where}.variant must name the row's variant: {{<varying key>: <value>, ...}}")
    for key in variant:
        if key not in varying:
            raise SpaceError(f"{where}.variant.{key} does not vary in this sweep{_near(key, varying)}")
    typed = C.clone(cfg)
    _apply(typed, variant, f"{where}.variant")
    flat = C.flatten(typed)
    return {k: flat[k] for k in variant}


def _paper(raw: Any, where: str, cfg: C.Config, flats: list[dict], varying: list[str],
           baseline: dict[str, Any]) -> Paper | None:
    """The ``paper:`` block, checked: each row names exactly one variant of the sweep (seeds
    aside) and no variant twice; metric names as the evaluator's; numbers in percent."""
    if raw is None:
        return None
    where = f"{where}: paper"
    data = _mapping(raw, where)
    _check_keys(data, PAPER_KEYS, where)
    source = data.get("source")
    if not isinstance(source, str) or not source.strip():
        raise SpaceError(f"{where}.source must name the paper and its table, got {source!r}")
    if not isinstance(data.get("rows"), list) or not data["rows"]:
        raise SpaceError(f"{where}.rows must be a non-empty list of {{variant: {{...}}, AP: ...}}")
    named = [k for k in varying if k.rsplit(".", 1)[-1] != "seed"]  # seeds are repeats of a variant
    rows: list[PaperRow] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(data["rows"]):
        at = f"{where}.rows[{i}]"
        row = _mapping(item, at)
        for key in row:
            if key not in PAPER_ROW_KEYS:
                raise SpaceError(f"{at}: {key!r} is neither a metric nor variant/delta"
                                 f"{_near(str(key), PAPER_ROW_KEYS)}")
        variant = _paper_variant(row.get("variant"), at, cfg, varying)
        hits = _unique([{k: f[k] for k in named} for f in flats if all(f[k] == v for k, v in variant.items())])
        if not hits:
            raise SpaceError(f"{at}.variant {_label(variant)} matches no grid point or variant of the sweep")
        if len(hits) > 1:
            raise SpaceError(f"{at}.variant {_label(variant)} matches {len(hits)} variants "
                             f"({'; '.join(_label(h) for h in hits)}); add keys to name one")
        ident = json.dumps(hits[0], sort_keys=True, default=str)
        if ident in seen:
            raise SpaceError(f"{at}.variant names the variant of rows[{seen[ident]}] again")
        seen[ident] = i
        values = {m: _percent(row[m], f"{at}.{m}", 0) for m in METRICS if m in row}
        deltas = _mapping(row.get("delta"), f"{at}.delta")
        for key in deltas:
            if key not in METRICS:
                raise SpaceError(f"{at}.delta: {key!r} is not a metric{_near(str(key), METRICS)}")
        delta = {m: _percent(v, f"{at}.delta.{m}", -100) for m, v in deltas.items()}
        if delta and all(hits[0][k] == v for k, v in baseline.items() if k in hits[0]):
            raise SpaceError(f"{at}: delta on the baseline's own row (the paper's Δ is vs the baseline)")
        if not values and not delta:
            raise SpaceError(f"{at} gives no number: AP: ... (metrics in percent) or delta: {{AP: ...}}")
        rows.append(PaperRow(variant, values, delta))
    paper = Paper(source.strip(), rows)
    size = len(json.dumps(paper.to_json(), default=str))
    if size > PAPER_TAG_LIMIT:
        raise SpaceError(f"{where} is {size} characters as JSON; MLflow tags hold {PAPER_TAG_LIMIT}")
    return paper


def _read(path: Path) -> tuple[str, dict]:
    """Parse: the file's text and its top-level mapping, every key a known one."""
    where = str(path)
    if not path.is_file():
        raise SpaceError(f"{where}: no such space file")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(raw, Mapping):
        raise SpaceError(f"{where}: expected a mapping at the top level")
    data = dict(raw)
    _check_keys(data, TOP_KEYS, where)
    return text, data


def _given_checkpoint(data: dict, checkpoint: str) -> dict:
    """``--checkpoint``: replaces the file's ``checkpoint:`` and drops its training ``set``."""
    data = {**data, "checkpoint": checkpoint}
    if isinstance(data.get("train"), Mapping):
        data["train"] = {k: v for k, v in data["train"].items() if k != "set"}
    return data


def _base_config(data: dict, path: Path) -> C.Config:
    """The config named by ``base:``: a preset, or a config YAML next to the space file."""
    where = str(path)
    base = data.get("base", C.DEFAULT_PRESET)
    if not isinstance(base, str):
        raise SpaceError(f"{where}: base must be a preset name or a YAML path, got {base!r}")
    if base not in C.preset_names():
        candidate = (path.parent / base)
        if not candidate.is_file():
            raise SpaceError(f"{where}: base {base!r} is neither a preset ({', '.join(C.preset_names())}) "
                             f"nor a file next to the space file")
        base = str(candidate.resolve())
    try:
        return C.load_config(base)
    except C.ConfigError as exc:
        raise SpaceError(f"{where}: base: {exc}") from None


def _cli(cli_overrides: list[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``--set KEY=VALUE`` (strings, parsed as ``ioulab train`` parses them) or a ready mapping."""
    if isinstance(cli_overrides, Mapping):
        return dict(cli_overrides)
    try:
        return dict(C.parse_override(o) for o in cli_overrides)
    except C.ConfigError as exc:
        raise SpaceError(str(exc)) from None


def _stages(data: dict, where: str) -> tuple[dict[str, StageSettings], dict[str, Any]]:
    """Resources and concurrency of each stage (the stage's own, else the file's) and the
    training stage's ``set`` (no inference keys: evaluations apply those)."""
    resources = _resources(data.get("resources"), f"{where}: resources", Resources())
    concurrency = _integer(data.get("concurrency", 1), f"{where}: concurrency", 1)
    stages: dict[str, StageSettings] = {}
    stage_set: dict[str, Any] = {}
    for stage, allowed in STAGE_KEYS.items():
        body = _mapping(data.get(stage), f"{where}: {stage}")
        _check_keys(body, allowed, f"{where}: {stage}")
        stages[stage] = StageSettings(
            _stage_resources(stage, body, resources, where),
            _integer(body.get("concurrency", concurrency), f"{where}: {stage}.concurrency", 1))
        if stage == "train":
            stage_set = _overrides(body.get("set"), f"{where}: train.set")
            for key in stage_set:
                if is_inference_key(key):
                    raise SpaceError(f"{where}: train.set.{key}: inference keys belong in set or grid "
                                     "(the training stage trains; evaluations apply inference keys)")
    return stages, stage_set


def _grid(data: dict, where: str) -> dict[str, list]:
    """``grid:``: dotted key → a non-empty list of distinct values."""
    grid: dict[str, list] = {}
    for key, values in _mapping(data.get("grid"), f"{where}: grid").items():
        if isinstance(values, Mapping):
            raise SpaceError(f"{where}: grid.{key}: use dotted keys (grid: {{a.b.c: [1, 2]}})")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: grid.{key} must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise SpaceError(f"{where}: grid.{key} lists a value twice: {values!r}")
        grid[str(key)] = values
    return grid


def _variants(data: dict, where: str) -> list[dict]:
    """``variants:``: a non-empty list of distinct, non-empty mappings of dotted keys."""
    variants_raw = data.get("variants")
    variants: list[dict] = []
    if variants_raw is None:
        return variants
    if not isinstance(variants_raw, list) or not variants_raw:
        raise SpaceError(f"{where}: variants must be a non-empty list of mappings of dotted keys")
    for i, variant in enumerate(variants_raw):
        v = _overrides(variant, f"{where}: variants[{i}]")
        if not v:
            raise SpaceError(f"{where}: variants[{i}] is empty")
        variants.append(v)
    if len({json.dumps(v, sort_keys=True, default=str) for v in variants}) != len(variants):
        raise SpaceError(f"{where}: variants lists the same variant twice")
    return variants


def _check_axes(grid: dict, variants: list[dict], where: str, cli: dict, fixed: dict, stage_set: dict) -> None:
    """Something varies, and every varying key is set in one place only (not also fixed)."""
    if not grid and not variants:
        raise SpaceError(f"{where}: nothing to sweep: give a grid and/or variants")
    variant_keys = {k for v in variants for k in v}
    for key in grid:
        if key in variant_keys:
            raise SpaceError(f"{where}: grid.{key} is also set by variants; set each key in one place")
    for key in (*grid, *variant_keys):
        if key in cli:
            raise SpaceError(f"--set {key}: the key varies in {where}; it cannot be fixed too")
        if key in fixed:
            raise SpaceError(f"{where}: set.{key}: the key also varies in the grid/variants")
        if key in stage_set:
            raise SpaceError(f"{where}: train.set.{key}: the key also varies in the grid/variants")


def _check_values(cfg: C.Config, grid: dict, variants: list[dict], where: str) -> None:
    """Every grid value and every variant where it is written (the file and the key)."""
    for key, values in grid.items():
        for value in values:
            _apply(C.clone(cfg), {key: value}, f"{where} (grid)")
    for i, variant in enumerate(variants):
        _apply(C.clone(cfg), variant, f"{where} (variants[{i}])")


def _checkpoint(data: dict, where: str) -> str | None:
    """``checkpoint:`` (a path or ``mlflow:<run id>``), or None: train the models."""
    checkpoint = data.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint.strip()):
        raise SpaceError(f"{where}: checkpoint must be a path or mlflow:<run id>, got {checkpoint!r}")
    return checkpoint


def _point_configs(points: list[dict], train_cfg: C.Config, checkpoint: str | None, where: str) -> list[dict]:
    """Every point as a whole: its flat config (what an evaluation, or the training trial, runs
    with); without a checkpoint also its training trial's config, checked as ``ioulab train``."""
    flats = []
    for overrides in points:
        label = _label(overrides)
        full = C.clone(train_cfg)
        _apply(full, overrides, f"{where} (grid point {label})")
        if checkpoint is None:  # else the checkpoint's stored config decides (checkpoint_source.check_checkpoint)
            check_trial_config(full, where, label)
            training = C.clone(train_cfg)  # the training trial's config (no inference-only keys)
            _apply(training, _train_part(overrides), f"{where} (grid point {label})")
            check_trial_config(training, where, label)
        flats.append(C.flatten(full))
    return flats


def _varying(flats: list[dict], where: str) -> list[str]:
    """The config keys whose value differs between points."""
    varying = [k for k in flats[0] if len({json.dumps(f[k], default=str) for f in flats}) > 1]
    if not varying:
        raise SpaceError(f"{where}: the grid does not change any config value")
    return varying


def _train_part(point: dict) -> dict:
    return {k: v for k, v in point.items() if not is_inference_key(k)}


def _infer_part(point: dict) -> dict:
    return {k: v for k, v in point.items() if is_inference_key(k)}


def _trials(points: list[dict], checkpoint: str | None, axes: list[str], data: dict,
            where: str) -> tuple[list[Point], list[EvalPoint], str | None]:
    """Plan: the training trials (one per distinct training part) and the evaluation trials (one
    per point when a checkpoint is given or any point has an inference part). ``axes``: every
    key the grid, the variants or the training stage's ``set`` set."""
    if checkpoint is None:
        parts = _unique([_train_part(p) for p in points])
        train_points = [Point(i, p, _label(p)) for i, p in enumerate(parts)]
        eval_points = []
        if any(_infer_part(p) for p in points):
            eval_points = [EvalPoint(i, _infer_part(p), _label(p), parts.index(_train_part(p)))
                           for i, p in enumerate(points)]
        return train_points, eval_points, None
    for key in axes:
        if not is_inference_key(key):
            raise SpaceError(f"{where}: {key} changes the trained model, but checkpoint: fixes the "
                             "model; remove checkpoint: to train one model per value")
    if data.get("early_stopping") is not None:
        raise SpaceError(f"{where}: early_stopping needs training; this sweep only evaluates {checkpoint}")
    return [], [EvalPoint(i, p, _label(p), None) for i, p in enumerate(points)], checkpoint.strip()


def _objective(data: dict, where: str) -> tuple[str, str]:
    """(metric, mode) of the sweep."""
    metric = data.get("metric", "AP")
    if metric not in METRICS:
        raise SpaceError(f"{where}: metric {metric!r} is not one of {', '.join(METRICS)}")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise SpaceError(f"{where}: mode must be max or min, got {mode!r}")
    return metric, mode


def _early_stopping(raw: Any, tcfg: C.TrainConfig, where: str) -> EarlyStopping | None:
    """``early_stopping:`` (ASHA) checked against the training schedule ``tcfg``."""
    if raw is None:
        return None
    es = _mapping(raw, f"{where}: early_stopping")
    _check_keys(es, EARLY_STOPPING_KEYS, f"{where}: early_stopping")
    if es.get("type", "asha") != "asha":
        raise SpaceError(f"{where}: early_stopping.type must be asha, got {es.get('type')!r}")
    if tcfg.eval_period <= 0:
        raise SpaceError(f"{where}: early_stopping needs validation AP during training: "
                         "set train.eval_period > 0")
    if tcfg.eval_period % tcfg.checkpoint_period:
        raise SpaceError(f"{where}: early_stopping: train.eval_period ({tcfg.eval_period}) must be a "
                         f"multiple of train.checkpoint_period ({tcfg.checkpoint_period})")
    max_t = es.get("max_t", tcfg.max_iters)
    if not max_t:
        raise SpaceError(f"{where}: early_stopping.max_t is needed when train.max_iters is 0")
    return EarlyStopping(_integer(es.get("grace_period", tcfg.eval_period), f"{where}: early_stopping.grace_period", 1),
                         _number(es.get("reduction_factor", 2), f"{where}: early_stopping.reduction_factor", 1, inclusive=False),
                         _integer(max_t, f"{where}: early_stopping.max_t", 1))


def _baseline(raw: Any, train_cfg: C.Config, flats: list[dict], varying: list[str], where: str) -> dict[str, Any]:
    """The baseline's varying values: the first point's by default; a given ``baseline:`` typed
    as the config types it and completed with the keys its points agree on."""
    if raw is None:
        return {k: flats[0][k] for k in varying}
    baseline = _overrides(raw, f"{where}: baseline")
    for key, value in baseline.items():
        if key not in varying:
            raise SpaceError(f"{where}: baseline.{key} does not vary in this sweep{_near(key, varying)}")
        _apply(C.clone(train_cfg), {key: value}, f"{where} (baseline)")
    typed = C.clone(train_cfg)
    _apply(typed, baseline, f"{where} (baseline)")
    baseline = {k: C.flatten(typed)[k] for k in baseline}
    matching = [f for f in flats if all(f[k] == v for k, v in baseline.items())]
    if not matching:
        raise SpaceError(f"{where}: baseline {baseline} matches no grid point")
    # Complete it with the keys its points agree on (the coupled values of its variant).
    baseline |= {k: matching[0][k] for k in varying if k not in baseline
                 and all(f[k] == matching[0][k] for f in matching)}
    return {k: baseline[k] for k in varying if k in baseline}


def _sweep_name(name: str | None, data: dict, path: Path, profile: str | None) -> str:
    """``--name``, else the file's ``name:`` (else its file name) with the profile appended."""
    sweep_name = name or data.get("name") or path.stem
    if profile and not name and not data.get("name"):
        sweep_name = f"{path.stem}-{profile}"
    elif profile and not name:
        sweep_name = f"{sweep_name}-{profile}"
    if not isinstance(sweep_name, str) or not sweep_name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SpaceError(f"{path}: name {sweep_name!r} must use letters, digits, '-', '_' or '.'")
    return sweep_name


def load_space(path: str | Path, cli_overrides: list[str] | Mapping[str, Any] = (),
               profile: str | None = None, name: str | None = None, checkpoint: str | None = None) -> Plan:
    """Read and validate a space file; return its plan. Raises :class:`SpaceError`.

    parse (file, profile) → the fixed config (base + set + --set) → validate the axes and every
    point → plan the trials → metric, early stopping, baseline, paper, name. ``checkpoint``
    (``--checkpoint``) replaces the file's ``checkpoint:`` and its training stage: the sweep then
    evaluates that checkpoint only."""
    path = Path(path)
    where = str(path)
    text, data = _read(path)
    data, chosen = _merge_profile(data, profile, where)
    if checkpoint is not None:
        data = _given_checkpoint(data, checkpoint)
    cfg = _base_config(data, path)
    fixed = _overrides(data.get("set"), f"{where}: set")
    _apply(cfg, fixed, f"{where} (set)")
    cli = _cli(cli_overrides)
    _apply(cfg, cli, "--set")
    stages, stage_set = _stages(data, where)
    grid, variants = _grid(data, where), _variants(data, where)
    _check_axes(grid, variants, where, cli=cli, fixed=fixed, stage_set=stage_set)
    _check_values(cfg, grid, variants, where)
    points = _points(grid, variants)
    checkpoint = _checkpoint(data, where)
    train_cfg = C.clone(cfg)
    _apply(train_cfg, stage_set, f"{where} (train.set)")
    flats = _point_configs(points, train_cfg, checkpoint, where)
    varying = _varying(flats, where)
    axes = [*grid, *{k: None for v in variants for k in v}, *stage_set]
    train_points, eval_points, checkpoint = _trials(points, checkpoint, axes, data, where)
    metric, mode = _objective(data, where)
    max_failures = _integer(data.get("max_failures", 2), f"{where}: max_failures", -1)
    keep = _integer(data.get("keep_checkpoints", 2), f"{where}: keep_checkpoints", 1)
    early = _early_stopping(data.get("early_stopping"), train_cfg.train, where)
    baseline = _baseline(data.get("baseline"), train_cfg, flats, varying, where)
    paper = _paper(data.get("paper"), where, train_cfg, flats, varying, baseline)
    return Plan(
        name=_sweep_name(name, data, path, chosen), space_file=str(path), profile=chosen,
        train_config=C.to_dict(train_cfg), train_points=train_points, eval_points=eval_points,
        eval_overrides={k: v for k, v in {**fixed, **cli}.items() if not k.startswith(("model.", "train."))},
        checkpoint=checkpoint, metric=metric, mode=mode, train=stages["train"], eval=stages["eval"],
        max_failures=max_failures, keep_checkpoints=keep, early_stopping=early, varying_keys=varying,
        baseline=baseline, description=str(data.get("description", "") or ""), source_text=text, paper=paper)


def trial_config(plan: Plan, point: Point) -> C.Config:
    """The full config of a training point."""
    cfg = C.from_dict(copy.deepcopy(plan.train_config), source=f"{plan.space_file} (plan)")
    C.apply_overrides(cfg, dict(point.overrides), source=f"{plan.space_file} (grid)")
    return cfg


def fixed_settings(plan: Plan) -> list[str]:
    """``key=value`` of every setting all trials share whose value is not the dataclass default
    (the preset's and the space file's choices, e.g. the papers' settings of an ``r50`` profile)."""
    defaults = C.flatten(C.Config())
    shared = C.flatten(C.from_dict(plan.train_config))
    return [f"{k}={v}" for k, v in shared.items() if k not in plan.varying_keys and v != defaults.get(k)]


def describe(plan: Plan) -> str:
    """A human summary of the plan (``ioulab sweep --dry-run``)."""
    lines = [f"sweep {plan.name} ({plan.space_file}{', profile ' + plan.profile if plan.profile else ''})",
             f"  varying: {', '.join(plan.varying_keys)}",
             f"  fixed (where not ioulab's defaults): {', '.join(fixed_settings(plan)) or 'none'}",
             f"  metric: {plan.metric} ({plan.mode})"]
    if plan.train_points:
        r = plan.train.resources
        lines.append(f"  training trials: {len(plan.train_points)} (cpu {r.cpu:g}, gpu {r.gpu:g}, "
                     f"{plan.train.concurrency} at a time)")
        lines += [f"    train {p.index:3d}  {p.label}" for p in plan.train_points]
    if plan.eval_points:
        r = plan.eval.resources
        source = plan.checkpoint or "the training trials"
        lines.append(f"  evaluation trials: {len(plan.eval_points)} of {source} (cpu {r.cpu:g}, "
                     f"gpu {r.gpu:g}, {plan.eval.concurrency} at a time)")
        lines += [f"    eval  {p.index:3d}  {p.label}" for p in plan.eval_points]
    if plan.paper is not None:
        lines.append(f"  paper: {plan.paper.source} ({len(plan.paper.rows)} rows, "
                     "printed beside ours by `ioulab report`)")
    return "\n".join(lines)
