"""What the training loop tells the outside world. The detector never imports MLflow or Ray: the
platform passes an object with these methods (``ioulab.platform.tracking``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class RunLogger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...


class NullLogger:
    """Logs nothing (tests, library use)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass
