"""Where a run stands, and putting every training object back there.

A run starts in one of two ways: new, or from a checkpoint that hrnet_cls.train.checkpointer chose.
:class:`Position` says where it stands (epoch, step, batch in epoch, metrics, data position);
:func:`restore` is the one place that moves the training objects to it, in this order:

1. the training loader, to the batch (same layout) or to the samples not yet trained on
   (another layout) of the stopped epoch;
2. the seed for dropout and drop path (seed + step, differing per rank);
3. model, optimizer, loss scaler and EMA weights, then this rank's RNG when the
   checkpoint has one per rank of this world size.

The LR needs nothing restored: hrnet_cls.train.optim.StepSchedule computes it from the recipe's
optim.lr and the loader's epoch progress, never from the optimizer's param_groups, so a
loaded optimizer state cannot change it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from timm.utils import random_seed

from hrnet_cls.train.state import restore_state
from hrnet_cls.config import Config
from hrnet_cls.data import TrainLoader
from hrnet_cls.distributed import DistInfo
from hrnet_cls.train.lock import RunDirError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where a run stands: what a checkpoint stores besides the weights and optimizer."""

    epoch: int = 0  # 0-based epoch to continue in (= epochs completed when batch_in_epoch is 0)
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of that epoch already trained (0: at its start)
    metrics: dict[str, float] = field(default_factory=dict)  # the latest validation metrics
    best_metric: float | None = None  # best val top-1 so far
    data: dict[str, Any] | None = None  # TrainLoader.state(): layout and the samples trained on
    epoch_sums: dict[str, float] | None = None  # engine.EpochSums of the stopped epoch (None at an epoch end)

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> Position:
        """The position stored in a checkpoint dict (hrnet_cls.train.state.build_state)."""
        return cls(epoch=int(state["epoch"]), step=int(state["step"]), batch_in_epoch=int(state["batch_in_epoch"]),
                   metrics=dict(state.get("metrics") or {}), best_metric=state.get("best_metric"),
                   data=state.get("data"), epoch_sums=state.get("epoch_sums"))


def restore(state: Mapping[str, Any] | None, cfg: Config, info: DistInfo, parts: Any,
            loader: TrainLoader) -> Position:
    """Put loader and training objects (hrnet_cls.train.engine.TrainParts) where ``state`` stopped,
    or seed a new run (state None); returns the position the epoch loop starts from.
    Raises RunDirError when the checkpoint cannot continue on this data."""
    position = Position.of(state) if state else Position()
    if state:
        _warn_global_batch(cfg, info, position)
        try:
            where = loader.resume(position.epoch, position.batch_in_epoch, position.data)
        except ValueError as exc:  # the same on every rank: the same files
            raise RunDirError(str(exc)) from None
        logger.info("resuming at %s, step %d", where, position.step)
    random_seed(cfg.train.seed + position.step, info.rank)  # dropout / drop-path differ per rank
    if state:
        restore_state(state, parts.net, parts.optimizer, parts.scaler, parts.ema.module, rank=info.rank,
                      world_size=info.world_size)
    return position


def _warn_global_batch(cfg: Config, info: DistInfo, position: Position) -> None:
    was = (position.data or {}).get("layout", {})
    if not was:
        return
    before, now = was["world_size"] * was["batch_size"], info.world_size * cfg.data.batch_size
    if before != now:
        logger.warning("global batch %d (%d x %d) differs from the checkpoint's %d (%d x %d): the lr per sample "
                       "continues as scheduled, but optim.lr=%g was set for the old batch (linear scaling: %g)",
                       now, info.world_size, cfg.data.batch_size, before, was["world_size"], was["batch_size"],
                       cfg.optim.lr, cfg.optim.lr * now / before)
