"""The update rule of a recipe: the optimizer (SGD, or any of timm's), the LR schedule (the paper's step, or
cosine) and the weight average (EMA) (docs/design.md §3, §4.1). The schedules are functions of the samples
seen, so a resume needs no scheduler state."""
from __future__ import annotations

import inspect
import logging
import math
from bisect import bisect_right

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class, param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn

from hrnet_cls.config import OptimConfig, ScheduleConfig

logger = logging.getLogger(__name__)

def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on every parameter, or, with wd_on_norm_and_bias off, on none of the 1-D tensors and
    biases (timm's rule: for HRNet-C exactly the norm parameters plus biases, never chosen by dotted name);
    with layer_decay, timm's per-layer groups, each with its ``lr_scale``."""
    if cfg.layer_decay:
        groups = param_groups_layer_decay(model, cfg.weight_decay, layer_decay=cfg.layer_decay,
                                          weight_decay_exclude_1d=not cfg.wd_on_norm_and_bias)
    elif cfg.wd_on_norm_and_bias:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay)
    groups = [g for g in groups if g["params"]]
    exempt = sum(len(g["params"]) for g in groups if g["weight_decay"] == 0.0)
    if exempt:
        logger.info("weight decay on %d tensors, none on %d norm/bias tensors",
                    sum(len(g["params"]) for g in groups) - exempt, exempt)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """optim.name "sgd": SGD with (Nesterov) momentum, fused where the parameters are on CUDA (GradScaler then
    reads no flag per step); any other name: timm's create_optimizer_v2 over the same groups, given the
    betas / eps / momentum its optimizer takes."""
    groups = param_groups(model, cfg)
    if cfg.name == "sgd":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused or None)
    accepted = inspect.signature(get_optimizer_class(cfg.name, bind_defaults=False)).parameters
    extra = {k: v for k, v in (("betas", tuple(cfg.betas)), ("eps", cfg.eps), ("momentum", cfg.momentum))
             if k in accepted}
    return create_optimizer_v2(groups, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:  # lr_scale: layer-wise decay's, as timm's schedulers apply it
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr


class StepSchedule:
    """Step decay with linear warm-up over epoch progress in samples: a step over fractional epochs
    [start, end] runs at base_lr x decay_rate ** (decay epochs <= start) x min(1, end / warmup_epochs),
    so epoch 30 is the first at the decayed lr (timm's MultiStepLRScheduler: epoch 29), and a
    sample's lr does not depend on the number of processes; the warm-up starts from warmup_lr."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float):
        self.optimizer = optimizer
        self.decay_epochs = list(cfg.decay_epochs)
        self.decay_rate = cfg.decay_rate
        self.warmup_epochs, self.warmup_lr = cfg.warmup_epochs, cfg.warmup_lr
        self.base_lr = base_lr  # owned here: param_groups are only written, so a loaded state cannot change it

    def factor_at(self, start: float, end: float | None = None) -> float:
        """Multiplier of the peak lr for a step over epoch progress [start, end] (warmup_lr 0)."""
        factor = self.decay_rate ** bisect_right(self.decay_epochs, start)
        if self.warmup_epochs:
            factor *= min(1.0, (start if end is None else end) / self.warmup_epochs)
        return factor

    def lr_at(self, start: float, end: float) -> float:
        lr = self.base_lr * self.factor_at(start, end)
        if self.warmup_lr and end < self.warmup_epochs:
            top = self.base_lr * self.decay_rate ** bisect_right(self.decay_epochs, start)
            lr = self.warmup_lr + (top - self.warmup_lr) * end / self.warmup_epochs
        return lr

    def step(self, start: float, end: float) -> float:
        """Set every group's lr for the step over [start, end] (call before optimizer.step()); returns it."""
        lr = self.lr_at(start, end)
        _set_lr(self.optimizer, lr)
        return lr


class CosineSchedule:
    """timm's CosineLRScheduler (one cycle, warm-up not a prefix) over epoch progress in samples: a step
    starting at fractional epoch t runs at warmup_lr + t (lr - warmup_lr) / warmup_epochs in the warm-up,
    else min_lr + (lr - min_lr) (1 + cos(pi t / epochs)) / 2."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float):
        self.optimizer, self.base_lr = optimizer, base_lr
        self.epochs, self.min_lr = cfg.epochs, cfg.min_lr
        self.warmup_epochs, self.warmup_lr = cfg.warmup_epochs, cfg.warmup_lr

    def lr_at(self, start: float, end: float) -> float:
        if start < self.warmup_epochs:
            return self.warmup_lr + start * (self.base_lr - self.warmup_lr) / self.warmup_epochs
        if start >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * start / self.epochs))

    def step(self, start: float, end: float) -> float:
        lr = self.lr_at(start, end)
        _set_lr(self.optimizer, lr)
        return lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig,
                    base_lr: float) -> StepSchedule | CosineSchedule:
    """schedule.name's schedule over optimizer, peaking at base_lr (the recipe's optim.lr)."""
    return (CosineSchedule if cfg.name == "cosine" else StepSchedule)(optimizer, cfg, base_lr)


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
