"""`ioulab report` / `ioulab compare` only read: a store that is not there is an error, never
created (no folder, no database file, no tables written into a foreign file)."""
from __future__ import annotations

import pytest

from tests.platform.report.helpers import cli

RUN_ID = "0" * 32


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", [["report", "losses"], ["compare", RUN_ID]], ids=["report", "compare"])
def test_missing_sqlite_folder_or_file_is_an_error_and_creates_nothing(command, tmp_path):
    for target in (tmp_path / "no" / "such" / "dir" / "mlflow.db", tmp_path / "missing.db"):
        rc, out, err = cli(*command, "--tracking-uri", f"sqlite:///{target}")
        assert rc == 2 and out == ""
        assert err.startswith("ioulab: error: no MLflow store at") and err.count("\n") == 1, err
        assert str(target) in err and "nothing was created" in err
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("command", [["report", "losses"], ["compare", RUN_ID]], ids=["report", "compare"])
def test_file_that_is_not_a_store_is_left_alone(command, tmp_path):
    empty, text = tmp_path / "empty.db", tmp_path / "notes.db"
    empty.write_bytes(b"")
    text.write_text("not a database")
    for target, before in ((empty, b""), (text, b"not a database")):
        rc, _, err = cli(*command, "--tracking-uri", f"sqlite:///{target}")
        assert rc == 2 and f"{target} is not an MLflow store" in err and err.count("\n") == 1, err
        assert target.read_bytes() == before  # MLflow would have written its tables into it
    assert _listing(tmp_path) == ["empty.db", "notes.db"]


def test_default_store_in_the_working_directory_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc, _, err = cli("report", "losses")
    assert rc == 2 and f"{tmp_path / 'mlflow.db'} does not exist" in err
    assert _listing(tmp_path) == []


def test_missing_file_store_folder(tmp_path):
    rc, _, err = cli("compare", RUN_ID, "--tracking-uri", (tmp_path / "mlruns").as_uri())
    assert rc == 2 and "no MLflow store at file://" in err
    assert _listing(tmp_path) == []


def test_existing_store_still_works(store, tmp_path):
    rc, out, err = cli("compare", store.ids["t0"], "--tracking-uri", store.uri)
    assert rc == 0, err
