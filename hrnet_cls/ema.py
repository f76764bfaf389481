"""Exponential moving average of the weights, chosen once when training objects are built.

``build_ema`` returns timm's ``ModelEmaV3`` (parameters and buffers, in place, foreach) or a
``NoEma`` whose ``update`` does nothing, so the training loop calls ``ema.update(model)``
after every optimizer step without asking whether EMA is on. ``ema.module`` is the averaged
copy to validate and checkpoint, or None.
"""
from __future__ import annotations

from timm.utils import ModelEmaV3
from torch import nn


class NoEma:
    """Stands in for ModelEmaV3 when ``train.ema`` is false."""

    module: nn.Module | None = None

    def update(self, model: nn.Module, step: int | None = None) -> None:
        pass


def build_ema(model: nn.Module, enabled: bool, decay: float) -> ModelEmaV3 | NoEma:
    """EMA of the bare model (no DDP / compile wrapper): build it after the model is on its
    device, in its memory format and (with SyncBN) converted, so the copy matches it.

    decay: per optimizer step; the average spans about 1 / (1 - decay) steps.
    """
    if not enabled:
        return NoEma()
    return ModelEmaV3(model, decay=decay)
