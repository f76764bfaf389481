"""The update rule of a recipe: SGD, the paper's step LR schedule, and the weight average (EMA)
(docs/design.md §3, §4.1). The schedule is a function of the samples seen, so a resume needs no
scheduler state."""
from __future__ import annotations

import logging
from bisect import bisect_right

import torch
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn

from hrnet_cls.config import OptimConfig, ScheduleConfig

logger = logging.getLogger(__name__)

def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum; weight decay on every parameter, or, with wd_on_norm_and_bias
    off, on none of the 1-D tensors and biases (timm's ``param_groups_weight_decay``: for HRNet-C
    exactly the norm parameters plus biases, never chosen by dotted name)."""
    if cfg.wd_on_norm_and_bias:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
        exempt = sum(len(g["params"]) for g in groups if g["weight_decay"] == 0.0)
        total = sum(len(g["params"]) for g in groups)
        logger.info("weight decay on %d tensors, none on %d norm/bias tensors", total - exempt, exempt)
    groups = [g for g in groups if g["params"]]
    fused = all(p.is_cuda for g in groups for p in g["params"])  # one kernel; GradScaler then reads no flag per step
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None)


class StepSchedule:
    """Step decay with linear warm-up over epoch progress in samples: a step over fractional epochs
    [start, end] runs at base_lr x decay_rate ** (decay epochs <= start) x min(1, end / warmup_epochs),
    so epoch 30 is the first at the decayed lr (timm's MultiStepLRScheduler: epoch 29), and a
    sample's lr does not depend on the number of processes."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float):
        self.optimizer = optimizer
        self.decay_epochs = list(cfg.decay_epochs)
        self.decay_rate = cfg.decay_rate
        self.warmup_epochs = cfg.warmup_epochs
        self.base_lr = base_lr  # owned here: param_groups are only written, so a loaded state cannot change it

    def factor_at(self, start: float, end: float | None = None) -> float:
        """Multiplier of the peak lr for a step over epoch progress [start, end]."""
        factor = self.decay_rate ** bisect_right(self.decay_epochs, start)
        if self.warmup_epochs:
            factor *= min(1.0, (start if end is None else end) / self.warmup_epochs)
        return factor

    def step(self, start: float, end: float) -> float:
        """Set every group's lr for the step over [start, end] (call before optimizer.step()); returns it."""
        lr = self.base_lr * self.factor_at(start, end)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float) -> StepSchedule:
    """The paper's step schedule over optimizer, peaking at base_lr (the recipe's optim.lr)."""
    return StepSchedule(optimizer, cfg, base_lr)


class NoEma:
    """Stands in for the EMA when ``train.ema`` is false."""

    module: nn.Module | None = None

    def update(self, model: nn.Module, step: int | None = None) -> None:
        pass


class ListEma(ModelEmaV3):
    """timm's ModelEmaV3 whose update runs over tensor lists built once: ModelEmaV3 rebuilds both state
    dicts every step (about 2,000 entries for W18: milliseconds of host time in a launch-bound step).
    The same foreach lerp, so the same weights; the lists alias the tensors, which training and
    load_state_dict change in place."""

    _lists: tuple[int, list, list, list, list] | None = None

    @torch.no_grad()
    def apply_update_(self, model: nn.Module, decay: float) -> None:
        if self._lists is None or self._lists[0] != id(model):
            pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
            floats, others = [p for p in pairs if p[0].is_floating_point()], [p for p in pairs if not p[0].is_floating_point()]
            self._lists = (id(model), [e for e, _ in floats], [m for _, m in floats], [e for e, _ in others],
                           [m for _, m in others])
        _, ema, src, ema_other, src_other = self._lists
        if ema_other:
            torch._foreach_copy_(ema_other, src_other)  # BN's num_batches_tracked
        self._foreach_lerp_(ema, src, weight=1.0 - decay)


def build_ema(model: nn.Module, enabled: bool, decay: float) -> ListEma | NoEma:
    """EMA of the bare model (no DDP / compile wrapper), built after it is on its device, in its memory
    format and SyncBN-converted, so the copy matches it; decay per optimizer step."""
    if not enabled:
        return NoEma()
    return ListEma(model, decay=decay)
