"""The space file's ``paper:`` block (the paper's published numbers for rows of the sweep):
checked at load time (one-line errors naming the file and the row), kept in the plan, logged
with the sweep's parent run as the tag ``ioulab.paper``. No Ray."""
import json
import textwrap

import pytest
import yaml

from ioulab.platform.sweep.space import SpaceError, describe, load_space
from tests.platform.sweep.test_space import SPACES, write

SPACE = """\
base: cpu_tiny
grid: {train.seed: [0, 1]}
variants:
  - {model.roi_heads.box_loss.type: smooth_l1, model.roi_heads.box_loss.weight: 1.0}
  - {model.roi_heads.box_loss.type: giou, model.roi_heads.box_loss.weight: 12.0}
  - {model.roi_heads.box_loss.type: ciou, model.roi_heads.box_loss.weight: 12.0}
baseline: {model.roi_heads.box_loss.type: smooth_l1}
"""
GOOD_ROWS = """\
    - {variant: {model.roi_heads.box_loss.type: smooth_l1}, AP: 37.6, AP90: 11.2}
    - {variant: {model.roi_heads.box_loss.type: ciou}, delta: {AP: 1.0}}
"""


def paper_space(tmp_path, rows: str = GOOD_ROWS, head: str = 'source: "a paper, table 3"\n  rows:\n'):
    return write(tmp_path, SPACE + "paper:\n  " + head + textwrap.indent(textwrap.dedent(rows), "  "))


SHIPPED = sorted(p.name for p in SPACES.glob("*.yaml") if "paper" in yaml.safe_load(p.read_text()))


def test_some_shipped_spaces_carry_the_papers_numbers():
    assert {"ablation.yaml", "lambda.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_paper_block_loads_in_every_profile(name):
    data = yaml.safe_load((SPACES / name).read_text())
    for profile in data.get("profiles") or [None]:
        plan = load_space(SPACES / name, profile=profile)
        assert plan.paper is not None and plan.paper.source and plan.paper.rows
        assert all(set(r.variant) <= set(plan.varying_keys) for r in plan.paper.rows)
        assert f"paper: {plan.paper.source}" in describe(plan)


def test_ablation_and_lambda_hold_the_reproductions_numbers():
    rows = {json.dumps(r.variant, sort_keys=True): (r.values, r.delta)
            for r in load_space(SPACES / "ablation.yaml", profile="r50").paper.rows}
    full = {"AP": 39.3, "AP50": 57.6, "AP60": 53.2, "AP70": 47.0, "AP80": 37.0, "AP90": 17.5}
    assert rows == {'{"inference.mode": "baseline"}': ({"AP": 37.8}, {}),
                    '{"inference.iou_nms.rank": "iou", "inference.mode": "iou_nms"}': ({"AP": 38.7}, {}),
                    '{"inference.mode": "refine", "inference.refine.lam": 0.5}': (full, {})}
    lam = load_space(SPACES / "lambda.yaml", profile="r50").paper.rows
    assert [(r.variant, r.values, r.delta) for r in lam] == [
        ({"inference.refine.lam": 0.5}, full, {}), ({"inference.refine.lam": 2.0}, {}, {"AP": 0.1})]


def test_rows_name_variants_by_some_of_their_keys_and_seeds_are_repeats(tmp_path):
    plan = load_space(paper_space(tmp_path))
    assert [(r.variant, r.values, r.delta) for r in plan.paper.rows] == [
        ({"model.roi_heads.box_loss.type": "smooth_l1"}, {"AP": 37.6, "AP90": 11.2}, {}),
        ({"model.roi_heads.box_loss.type": "ciou"}, {}, {"AP": 1.0})]
    assert plan.paper.to_json() == {"source": "a paper, table 3", "rows": [
        {"variant": {"model.roi_heads.box_loss.type": "smooth_l1"}, "AP": 37.6, "AP90": 11.2},
        {"variant": {"model.roi_heads.box_loss.type": "ciou"}, "delta": {"AP": 1.0}}]}


def test_the_paper_block_changes_no_trial(tmp_path):
    with_paper = load_space(paper_space(tmp_path))
    without = load_space(write(tmp_path, SPACE, name="plain.yaml"))
    assert without.paper is None and with_paper.fingerprint() == without.fingerprint()


V = "{variant: {model.roi_heads.box_loss.type: giou}"


@pytest.mark.parametrize("rows, needle", [
    (f"- {V}, AP95: 40.0}}", "paper.rows[0]: 'AP95' is neither a metric nor variant/delta; did you mean"),
    (f"- {V}, delta: {{APxl: 1.0}}}}", "paper.rows[0].delta: 'APxl' is not a metric"),
    (f"- {V}, AP: high}}", "paper.rows[0].AP must be a number, got 'high'"),
    (f"- {V}, AP: true}}", "paper.rows[0].AP must be a number, got True"),
    (f"- {V}, AP: 378}}", "paper.rows[0].AP must be <= 100 (percent), got 378"),
    (f"- {V}, delta: {{AP: '+1'}}}}", "paper.rows[0].delta.AP must be a number, got '+1'"),
    (f"- {V}}}", "paper.rows[0] gives no number"),
    ("- {variant: {model.roi_heads.box_loss.type: diou}, AP: 38.0}",
     "paper.rows[0].variant box_loss.type=diou matches no grid point or variant of the sweep"),
    ("- {variant: {model.roi_heads.box_loss.weight: 12.0}, AP: 38.0}",
     "paper.rows[0].variant box_loss.weight=12.0 matches 2 variants"),
    ("- {variant: {model.roi_heads.box_loss.typ: giou}, AP: 38.0}",
     "paper.rows[0].variant.model.roi_heads.box_loss.typ does not vary in this sweep; did you mean"),
    ("- {variant: {train.lr: 0.02}, AP: 38.0}", "paper.rows[0].variant.train.lr does not vary in this sweep"),
    ("- {variant: {model.roi_heads.box_loss.type: 3}, AP: 38.0}", "model.roi_heads.box_loss.type"),
    ("- {variant: {}, AP: 38.0}", "paper.rows[0].variant must name the row's variant"),
    ("- {AP: 38.0}", "paper.rows[0].variant must name the row's variant"),
    (f"- {V}, AP: 38.0}}\n- {V}, AP90: 17.0}}", "paper.rows[1].variant names the variant of rows[0] again"),
    ("- {variant: {model.roi_heads.box_loss.type: smooth_l1}, delta: {AP: 0.5}}",
     "paper.rows[0]: delta on the baseline's own row"),
    ("- [giou, 38.0]", "paper.rows[0] must be a mapping"),
])
def test_bad_rows_fail_in_one_line_naming_file_and_row(tmp_path, rows, needle):
    path = paper_space(tmp_path, rows)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize("head, needle", [
    ("rows: []\n", "paper.source must name the paper and its table, got None"),
    ('source: "x"\n  rows: []\n', "paper.rows must be a non-empty list"),
    ('source: ""\n  rows:\n', "paper.source must name the paper"),
    ('source: x\n  table: 3\n  rows:\n', "paper: unknown key 'table'"),
])
def test_bad_paper_block_fails_in_one_line(tmp_path, head, needle):
    path = paper_space(tmp_path, head=head, rows="" if "[]" in head else GOOD_ROWS)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    assert needle in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_paper_block_too_long_for_an_mlflow_tag_is_refused(tmp_path):
    path = paper_space(tmp_path, head=f'source: "{"x" * 9000}"\n  rows:\n')
    with pytest.raises(SpaceError, match=r"paper is \d+ characters as JSON; MLflow tags hold 8000"):
        load_space(path)


def test_the_parent_run_carries_the_paper_block(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ioulab.platform.sweep.driver import _open_parent

    monkeypatch.chdir(tmp_path)
    plan = load_space(paper_space(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _open_parent(plan, {"sweep_id": "s1"}, uri, "ioulab-sweeps", str(tmp_path / "root"))
    tags = MlflowClient(uri).get_run(parent.run_id).data.tags
    assert json.loads(tags["ioulab.paper"]) == plan.paper.to_json()
    # --resume with the numbers edited: the parent run found again carries the file's numbers now.
    edited = load_space(paper_space(tmp_path, GOOD_ROWS.replace("37.6", "37.9")))
    again = _open_parent(edited, {"sweep_id": "s1"}, uri, "ioulab-sweeps", str(tmp_path / "root"))
    assert again.reattached and again.run_id == parent.run_id
    again.close()
    tags = MlflowClient(uri).get_run(parent.run_id).data.tags
    assert json.loads(tags["ioulab.paper"])["rows"][0]["AP"] == 37.9
    no_paper = load_space(write(tmp_path, SPACE, name="plain.yaml"))
    other = _open_parent(no_paper, {"sweep_id": "s2"}, uri, "ioulab-sweeps", str(tmp_path / "root"))
    assert "ioulab.paper" not in MlflowClient(uri).get_run(other.run_id).data.tags
