"""Numeric precision, resolved once (``train.precision``, validate.py's ``--precision``) into the autocast context
and loss scaler the loops use without asking which is on (fp32: both disabled)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve(name: str, device_type: str) -> str:
    """Map "auto" to bf16 on CUDA / fp32 elsewhere; reject fp16 off CUDA (ValueError)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is not one of {PRECISIONS}")
    if name == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if name == "fp16" and device_type != "cuda":
        raise ValueError(f"precision 'fp16' needs a CUDA device, running on {device_type}")
    return name


@dataclass(frozen=True)
class Precision:
    """A resolved precision on one device type."""

    name: str  # bf16 | fp16 | fp32
    device_type: str

    @classmethod
    def of(cls, name: str, device: torch.device | str) -> Precision:
        device_type = torch.device(device).type
        return cls(resolve(name, device_type), device_type)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self) -> torch.autocast:
        """A fresh autocast context (disabled for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.name != "fp32")

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16; a disabled scaler (every method a pass-through) otherwise."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")
