"""SGD optimizer and the paper's step LR schedule (docs/design.md section 3).

The schedule is a pure function of the global optimizer step, so resuming needs only the
step counter stored in the checkpoint: there is no scheduler state to save.
"""
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
    """SGD with (Nesterov) momentum; weight decay on every parameter unless configured off.

    Off: timm's ``param_groups_weight_decay`` exempts every 1-D tensor (norm weights and
    biases, whatever their dotted names) and every ``.bias``. For HRNet-C that is exactly
    the normalisation-layer parameters plus all biases (tests/test_optim.py checks it on
    every variant); it never goes by names like ``transition1.0.1.weight``.
    """
    if cfg.wd_on_norm_and_bias:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
        exempt = sum(len(g["params"]) for g in groups if g["weight_decay"] == 0.0)
        total = sum(len(g["params"]) for g in groups)
        logger.info("weight decay on %d tensors, none on %d norm/bias tensors", total - exempt, exempt)
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


class StepSchedule:
    """Step decay with optional linear warm-up, a function of epoch progress measured in samples.

    A step that trains the samples between fractional epochs ``start`` and ``end`` (epoch +
    fraction of the epoch's samples; train_loader.TrainLoader.progress) runs at
    base_lr x decay_rate ** (number of decay epochs <= start) x min(1, end / warmup_epochs).
    With decay_epochs=[30] every step of epoch 29 runs at base_lr and the first step of epoch
    30 at base_lr x decay_rate (timm's MultiStepLRScheduler decays one epoch early). The
    warm-up reaches 1 on its last step and no step runs at lr 0. Being a function of samples
    seen, the lr of a sample does not change when a run resumes on another number of processes.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float):
        self.optimizer = optimizer
        self.decay_epochs = list(cfg.decay_epochs)
        self.decay_rate = cfg.decay_rate
        self.warmup_epochs = cfg.warmup_epochs
        # The peak lr of every group is the recipe's optim.lr, owned here: the optimizer's
        # param_groups are only written, so a state loaded on resume (before or after this
        # is built) cannot change the schedule.
        self.base_lr = base_lr

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
