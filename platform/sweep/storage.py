"""Sweep storage: a local folder or a URI that pyarrow understands (``s3://``, ``gs://``, ...).

The driver writes ``sweep.json`` and the summary here; ``finalize`` writes the summary of a
URI-backed sweep through it. Local writes are atomic (a temporary file, then a rename).
"""
from __future__ import annotations

import os
from pathlib import Path


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` storage (read and written through pyarrow), False for a path."""
    return "://" in path


def join(root: str, *parts: str) -> str:
    """``root/part/...`` with ``/`` for a URI and the platform's separator for a path."""
    return "/".join([root.rstrip("/"), *parts]) if is_uri(root) else str(Path(root, *parts))


def read_text(path: str) -> str | None:
    """The file's text, or None if it does not exist."""
    if not is_uri(path):
        p = Path(path)
        return p.read_text() if p.is_file() else None
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(fs_path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(fs_path) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder; a local file is replaced atomically."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    fs.create_dir(fs_path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(fs_path) as f:
        f.write(text.encode())
