"""Wall-clock timing of device work: CUDA runs asynchronously, so time the work, not its launch."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulated seconds of the ``with`` blocks run under it, the device synchronised at the end."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device, self.seconds = torch.device(device), 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by Python (item, tolist, bool, ...): on a GPU each one waits
    for the device, so the training and evaluation loops keep them out of the per-step path."""

    READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))
