"""Which ioulab code a process runs, so a sweep runs the same code on every node.

``ray job submit --working-dir .`` ships the repository, but the driver and every trial import the
``ioulab`` *installed* on their node (the working directory holds ``detector/`` and ``platform/``,
not an ``ioulab`` package). Two checks close that gap:

- the driver (:func:`check_working_dir`): when the working directory is an ioulab checkout, its
  source files must be the ones the driver imports, else the user's edits would never run;
- every trial (:func:`check_same_code`): its :func:`code_identity` must match the driver's, which
  travels in the trial's context; a node with another ioulab fails the trial, naming both.

The identity is the package version, the git commit of the imported sources (``git rev-parse``
in their folder, else ``$IOULAB_GIT_COMMIT``, e.g. set when an image is built, else "unknown")
and a digest of the source files themselves: the digest decides, so a wheel built from a commit
matches a checkout of that commit, and an uncommitted edit does not. Imports neither Ray nor torch.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from ioulab.detector.errors import UserError

# The ioulab packages (import name → folder of a checkout) and the files that make their code.
PACKAGES = {"ioulab.detector": "detector", "ioulab.platform": "platform", "ioulab.csrc": "csrc"}
SOURCE_SUFFIXES = (".py", ".yaml", ".h", ".cpp", ".cu", ".cuh")


class CodeMismatchError(UserError, RuntimeError):
    """Two processes of one sweep import different ioulab code."""


@dataclass(frozen=True)
class CodeIdentity:
    version: str
    commit: str
    digest: str    # sha256 (16 hex) of the source files: relative path and bytes

    def describe(self) -> str:
        return f"ioulab {self.version} (commit {self.commit[:12]}, code {self.digest})"

    def to_json(self) -> dict:
        return asdict(self)


def source_digest(folders: dict[str, Path]) -> str:
    """Digest of the source files under ``folders`` (label → folder), independent of where they
    live; caches (``__pycache__``) and hidden folders are skipped."""
    h = hashlib.sha256()
    for label in sorted(folders):
        root = folders[label]
        files = sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()
                       and not any(part.startswith((".", "__pycache__")) for part in p.relative_to(root).parts))
        for path in files:
            h.update(f"{label}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def installed_folders() -> dict[str, Path]:
    """Folder of each ioulab package this Python imports (label: its checkout folder name)."""
    out = {}
    for name, label in PACKAGES.items():
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            out[label] = Path(next(iter(spec.submodule_search_locations))).resolve()
    return out


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


@functools.lru_cache(maxsize=1)
def code_identity() -> CodeIdentity:
    """The identity of the ioulab this process imports (computed once per process)."""
    folders = installed_folders()
    try:
        version = importlib.metadata.version("ioulab")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    commit = git_commit(folders["detector"]) if "detector" in folders else None
    return CodeIdentity(version, commit or os.environ.get("IOULAB_GIT_COMMIT", "unknown"), source_digest(folders))


def check_same_code(expected: dict, where: str) -> None:
    """Raise :class:`CodeMismatchError` if this process's ioulab is not the driver's ``expected``
    (:meth:`CodeIdentity.to_json`). ``where`` names this process (e.g. the node)."""
    mine = code_identity()
    theirs = CodeIdentity(**expected)
    if (mine.version, mine.digest) != (theirs.version, theirs.digest):
        raise CodeMismatchError(
            f"{where} runs {mine.describe()} but the sweep's driver runs {theirs.describe()}: install the "
            "same ioulab on every node (e.g. pip install <the driver's checkout or wheel>), then --resume")


def checkout_folders(folder: Path) -> dict[str, Path] | None:
    """The package folders of ``folder`` if it is an ioulab checkout (its pyproject names ioulab)."""
    pyproject = folder / "pyproject.toml"
    try:
        text = pyproject.read_text()
    except OSError:
        return None
    if 'name = "ioulab"' not in text:
        return None
    return {label: folder / label for label in PACKAGES.values() if (folder / label).is_dir()}


def _location(folders: dict[str, Path]) -> str:
    return str(folders["detector"].parent) if "detector" in folders else "?"


def check_working_dir(folder: Path) -> None:
    """Raise :class:`CodeMismatchError` if ``folder`` (the driver's working directory, the folder
    ``ray job submit --working-dir`` ships) is an ioulab checkout whose sources differ from the
    ioulab this process imports: the sweep would not run the code the user submitted."""
    folders = checkout_folders(folder)
    installed = installed_folders()
    if not folders or all(folders.get(k) and folders[k].resolve() == v for k, v in installed.items()):
        return
    here = source_digest(folders)
    mine = code_identity()
    if here != mine.digest:
        raise CodeMismatchError(
            f"the working directory {folder} holds ioulab code {here}, but this Python imports "
            f"{mine.describe()} from {_location(installed)}: the trials would not run "
            "your code; install it on every node (pip install .) or run the sweep outside the checkout")
