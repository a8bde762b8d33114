"""Mixed precision: what ``train.amp`` / ``train.amp_dtype`` mean on a device, in one place.

    amp = None   on for CUDA, off elsewhere (the CPU default run is plain float32)
    amp = true   on for any device with autocast: ``train.device=cpu`` runs CPU autocast, the
                 same dispatch machinery (and the same custom-op autocast rules) as CUDA AMP
    amp = false  off

``amp_dtype`` bfloat16 needs no loss scaling (float32's exponent range); float16 does, so it gets
a :class:`torch.amp.GradScaler` (whose state is part of the checkpoint). Training and evaluation
use the same policy, so the metrics of an evaluation-only run match the trainer's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ioulab.detector.config import TrainConfig
from ioulab.detector.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class AmpUnavailableError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class AmpPolicy:
    enabled: bool
    dtype: torch.dtype
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of a forward pass (a no-op context when disabled)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for float16 (a disabled one passes everything through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.enabled and self.dtype == torch.float16)


def amp_policy(cfg: TrainConfig, device: torch.device) -> AmpPolicy:
    """Resolve ``cfg.amp`` / ``cfg.amp_dtype`` for ``device`` (see the module docstring)."""
    enabled = device.type == "cuda" if cfg.amp is None else cfg.amp
    if enabled and not torch.amp.is_autocast_available(device.type):
        raise AmpUnavailableError(f"train.amp=true: torch.autocast is not available on device "
                                  f"{device.type!r}; set train.amp=false")
    return AmpPolicy(enabled, DTYPES[cfg.amp_dtype], device.type)
