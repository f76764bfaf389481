"""SGD optimizer and the paper's step LR schedule (docs/design.md section 3).

The schedule is a pure function of the global optimizer step, so resuming needs only the
step counter stored in the checkpoint: there is no scheduler state to save.
"""
from __future__ import annotations

import logging
from bisect import bisect_right

import torch
from timm.optim import param_groups_weight_decay
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
    """Step decay with optional linear warm-up, evaluated per optimizer step.

    lr(epoch) = base_lr x decay_rate ** (number of decay epochs <= epoch) x warm-up factor,
    where epoch = step / steps_per_epoch is fractional. With decay_epochs=[30] every step
    of epoch 29 runs at base_lr and the first step of epoch 30 at base_lr x decay_rate
    (timm's MultiStepLRScheduler decays one epoch early). The warm-up factor rises
    linearly over warmup_epochs: (step + 1) / warmup_steps, reaching 1 on the last
    warm-up step, so no step runs at lr 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.decay_epochs = list(cfg.decay_epochs)
        self.decay_rate = cfg.decay_rate
        self.warmup_steps = cfg.warmup_epochs * steps_per_epoch
        # Peak lr per group, read once from the optimizer as built from the config: an
        # optimizer state loaded on resume cannot change it, the config decides.
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]

    def factor_at(self, epoch: float) -> float:
        """Multiplier of the peak lr at fractional epoch (= global step / steps_per_epoch)."""
        factor = self.decay_rate ** bisect_right(self.decay_epochs, epoch)
        if self.warmup_steps:
            factor *= min(1.0, (epoch * self.steps_per_epoch + 1) / self.warmup_steps)
        return factor

    def step(self, global_step: int) -> float:
        """Set every group's lr for optimizer step number global_step (0-based); returns it.

        Call before optimizer.step(), with the number of optimizer steps already taken.
        """
        factor = self.factor_at(global_step / self.steps_per_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        return self.optimizer.param_groups[0]["lr"]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int) -> StepSchedule:
    """The paper's step schedule over optimizer, with steps_per_epoch optimizer steps per epoch."""
    return StepSchedule(optimizer, cfg, steps_per_epoch)
