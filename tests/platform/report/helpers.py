"""Run the CLI in-process and read the markdown tables it writes."""
from __future__ import annotations

import contextlib
import io

from ioulab.platform.cli import main


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def md_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text`` as rows of cells (header first, the ---: line dropped)."""
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not set(line.strip()) <= set("|-:"):
                current.append([c.strip() for c in line.strip()[1:-1].split(" | ")])
        else:
            current = None
    return tables
