"""`ioulab bench eval --smoke`: our evaluator equals pycocotools and the bootstrap row is there."""
import json

import pytest

from ioulab.platform.cli import main


@pytest.mark.timeout(240)
def test_bench_eval_smoke(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["bench", "eval", "--smoke", "--images", "60", "--resamples", "50", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    steps = [r["step"] for r in payload["rows"]]
    assert steps[0] == "pycocotools COCOeval" and steps[1].startswith("ours")
    assert payload["pycocotools_equal"] is True
    assert payload["rows"][1]["max |Δ| vs pycocotools"] < 1e-6
    assert "paired bootstrap: 50 resamples" in steps[-1] and "ΔAP" in payload["rows"][-1]["AP"]
    assert "paired bootstrap" in capsys.readouterr().out
