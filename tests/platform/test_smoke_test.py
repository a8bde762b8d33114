"""``--smoke-test``: one flag with one meaning on every long command (tiny sizes, fast, the result
marked SMOKE TEST); ``--smoke`` stays a hidden alias where it existed."""
import json

import pytest

from ioulab.platform.cli import BENCHES, build_parser, main
from ioulab.platform.smoke import MARK

REQUIRED = {"eval": ["--checkpoint", "x.pth"], "sweep": ["search_spaces/smoke.yaml"],
            "bench latency": ["--checkpoint", "x.pth"]}
LONG = ["train", "eval", "sweep", *(f"bench {name}" for name in BENCHES)]


@pytest.mark.parametrize("command", LONG)
def test_every_long_command_takes_smoke_test(command):
    argv = [*command.split(), *REQUIRED.get(command, [])]
    assert build_parser(argv + ["--smoke-test"]).parse_args(argv + ["--smoke-test"]).smoke_test is True
    assert build_parser(argv).parse_args(argv).smoke_test is False


@pytest.mark.parametrize("command", ["bench eval", "bench prroi"])
def test_former_smoke_flag_is_a_hidden_alias(command, capsys):
    argv = command.split()
    assert build_parser(argv + ["--smoke"]).parse_args(argv + ["--smoke"]).smoke_test is True
    with pytest.raises(SystemExit):
        build_parser(argv + ["--help"]).parse_args(argv + ["--help"])
    help_text = capsys.readouterr().out
    assert "--smoke-test" in help_text and "--smoke " not in help_text and "--smoke\n" not in help_text


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``ioulab train --smoke-test`` of an IoUNet: tiny synthetic data, tiny model, 4 iterations."""
    out = tmp_path_factory.mktemp("smoke") / "train"
    assert main(["train", "--config", "cpu_tiny_iounet", "--smoke-test", "--no-mlflow", "--no-progress",
                 "--out", str(out)]) == 0
    return out


def test_train_smoke_test(smoke_run, capsys):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert "AP" in metrics and (smoke_run / "checkpoints" / "model_0000004.pth").is_file()
    config = (smoke_run / "config.yaml").read_text()
    assert "max_iters: 4" in config and "name: tiny" in config


def test_eval_smoke_test(smoke_run, tmp_path, capsys):
    checkpoint = smoke_run / "checkpoints" / "model_0000004.pth"
    assert main(["eval", "--checkpoint", str(checkpoint), "--smoke-test", "--no-mlflow", "--no-progress",
                 "--out", str(tmp_path / "ev")]) == 0
    assert MARK in capsys.readouterr().out
    assert "AP" in json.loads((tmp_path / "ev" / "metrics.json").read_text())


def test_bench_latency_smoke_test(smoke_run, tmp_path, capsys):
    checkpoint = smoke_run / "checkpoints" / "model_0000004.pth"
    out = tmp_path / "latency.json"
    assert main(["bench", "latency", "--checkpoint", str(checkpoint), "--smoke-test", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["title"].startswith(MARK)
    assert [r["row"] for r in payload["rows"]][:2] == ["baseline", "IoU head off"]
    assert len(payload["refine_steps"]) == 2  # the smoke test's two images


@pytest.mark.parametrize("bench", ["prroi", "nms", "train"])
def test_bench_smoke_test(bench, tmp_path):
    out = tmp_path / f"{bench}.json"
    assert main(["bench", bench, "--smoke-test", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["title"].startswith(MARK) and payload["rows"]


def test_sweep_smoke_test_plans_tiny_trials_under_a_marked_name(capsys):
    assert main(["sweep", "search_spaces/smoke.yaml", "--smoke-test", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"[ioulab] {MARK}") and "sweep smoke-smoke-test (" in out
    assert "train.max_iters=4" in out and "model.backbone.tiny_widths=[8, 16, 16, 16]" in out
