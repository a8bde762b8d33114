"""The code identity a sweep compares between its driver, its working directory and its trials."""
from __future__ import annotations

import shutil

import pytest

from ioulab.platform.sweep import codecheck
from ioulab.platform.sweep.codecheck import CodeIdentity, CodeMismatchError
from tests.platform.sweep.conftest import REPO


def copy_checkout(dest):
    """The repository's package folders and pyproject.toml (no caches, no .git)."""
    for label in codecheck.PACKAGES.values():
        shutil.copytree(REPO / label, dest / label, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_digest_is_of_the_files_not_their_location(tmp_path):
    copy = copy_checkout(tmp_path / "copy")
    here = codecheck.code_identity()
    assert codecheck.source_digest(codecheck.checkout_folders(copy)) == here.digest
    (copy / "detector" / "config.py").write_text((copy / "detector" / "config.py").read_text() + "# edit\n")
    assert codecheck.source_digest(codecheck.checkout_folders(copy)) != here.digest


def test_a_trial_with_the_drivers_code_passes():
    codecheck.check_same_code(codecheck.code_identity().to_json(), "node n1")


def test_a_trial_with_other_code_fails_naming_both():
    mine = codecheck.code_identity()
    driver = CodeIdentity(mine.version, "f" * 40, "0123456789abcdef")
    with pytest.raises(CodeMismatchError) as err:
        codecheck.check_same_code(driver.to_json(), "node n1")
    message = str(err.value)
    assert "node n1" in message and "\n" not in message
    assert f"commit {mine.commit[:12]}, code {mine.digest}" in message  # this process's
    assert f"commit {'f' * 12}, code 0123456789abcdef" in message      # the driver's


def test_another_version_with_the_same_files_fails_too():
    mine = codecheck.code_identity()
    with pytest.raises(CodeMismatchError, match="ioulab 9.9.9"):
        codecheck.check_same_code(CodeIdentity("9.9.9", mine.commit, mine.digest).to_json(), "node n1")


def test_a_working_dir_with_edits_the_installed_ioulab_lacks_is_refused(tmp_path):
    codecheck.check_working_dir(REPO)               # the editable install's own checkout
    codecheck.check_working_dir(tmp_path)           # not a checkout: nothing to compare
    copy = copy_checkout(tmp_path / "submitted")
    codecheck.check_working_dir(copy)               # a copy of the same code (ray job submit)
    (copy / "platform" / "sweep" / "driver.py").write_text("# the user's edit\n", encoding="utf-8")
    with pytest.raises(CodeMismatchError, match=f"the working directory {copy} holds ioulab code"):
        codecheck.check_working_dir(copy)
