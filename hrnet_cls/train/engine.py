"""The training objects of a recipe (:class:`TrainParts`, built once by :func:`build_parts`) and one
epoch over them (:func:`train_one_epoch`), as DeiT's engine.py. The loop reads no device value per
step: losses are summed on the device and read at log and save points (docs/design.md §6.3).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from hrnet_cls.config import Config, TrainConfig
from hrnet_cls.data import TrainLoader
from hrnet_cls.data.transforms import Normalize
from hrnet_cls.distributed import DistInfo, all_gather_object, all_reduce_sum
from hrnet_cls.train.optim import CosineSchedule, ListEma, NoEma, StepSchedule, build_ema, build_optimizer, build_scheduler
from hrnet_cls.precision import Precision
from hrnet_cls.train.preemption import StopRequest
from hrnet_cls.train.state import EpochSums
from hrnet_cls.train.tracking import Tracker

if TYPE_CHECKING:
    from hrnet_cls.train.checkpointer import Checkpointer

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, int, Any]  # images (B,3,H,W), targets (B,), skipped, positions (B,)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite on some process; raised on every process."""


class BadDataError(RuntimeError):
    """More bad samples than data.max_bad_fraction allows; raised on every process."""


BAD_WINDOW = 10_000  # images: the bad-sample budget is checked once an epoch has trained this many, and at its end


@dataclass
class TrainParts:
    """The objects of one optimizer step, built once from the config by train.py."""

    model: nn.Module  # forward/backward runs through this: the bare model or its DDP / compile wrapper
    net: nn.Module  # the bare model: what the EMA follows and checkpoints store
    criterion: nn.Module  # logits (B, C), targets (B,) or mixed soft targets (B, C) -> mean loss ()
    optimizer: torch.optim.Optimizer
    scheduler: StepSchedule | CosineSchedule  # sets the lr of each step from the epoch progress in samples
    precision: Precision  # resolved: bf16 | fp16 | fp32
    scaler: torch.amp.GradScaler  # loss scaling; enabled for fp16 only
    autocast: AbstractContextManager  # torch.autocast(device, dtype); disabled for fp32
    ema: ListEma | NoEma  # update(net) after every step
    device: torch.device
    memory_format: torch.memory_format  # of the input batches: channels_last or contiguous
    world_size: int  # processes; images per step = batch x world_size
    epochs: int  # of the whole run, for the log line and the ETA
    halt_on_nonfinite: bool  # stop on a NaN/inf loss; False under fp16, whose scaler skips those steps
    log_interval: int  # optimizer steps between log lines (and host syncs)
    max_bad_fraction: float  # bad samples per image trained in an epoch before the run stops
    erase: Callable[[torch.Tensor], torch.Tensor] | None = None  # timm's RandomErasing on the normalised batch
    mixup: Callable | None = None  # timm's Mixup: (images, targets) -> (mixed images, soft targets (B, C))
    accum: int = 1  # micro-batches per optimizer step
    clip_grad: float = 0.0  # max global grad norm (0 = off)
    no_sync: Callable[[], AbstractContextManager] = contextlib.nullcontext  # DDP's, on all but a step's last micro-batch


@dataclass(frozen=True)
class EpochResult:
    """What train_one_epoch did, summed over every process."""

    train_loss: float  # mean over the finite-loss steps
    lr: float  # of the last step
    images_per_s: float
    train_time_s: float
    train_images: int  # images trained on, all processes
    skipped: int  # bad samples replaced by the data pipeline
    nonfinite: int  # steps with a NaN / inf loss
    step: int  # global optimizer steps after the epoch (or the stop)
    batch: int  # batches of the loader's plan done
    stopped: bool  # a stop signal ended the epoch early, at a step boundary every process agreed on
    sums: EpochSums  # the totals these figures come from (what a stop's checkpoint carries)

    def metrics(self) -> dict[str, float]:
        """The numbers of an epoch's summary row (batch, stopped and sums are not metrics)."""
        return {k: v for k, v in asdict(self).items() if k not in ("batch", "stopped", "sums")}


def build_parts(cfg: Config, info: DistInfo, net: nn.Module, precision: Precision) -> TrainParts:
    """Every recipe choice, made once; ``net``: the bare model, on its device and in its memory format."""
    ema = build_ema(net, cfg.train.ema, cfg.train.ema_decay)  # before DDP: it copies the bare model
    device_ids = [info.device] if info.device.type == "cuda" else None
    model = nn.parallel.DistributedDataParallel(net, device_ids=device_ids) if info.world_size > 1 else net
    model = torch.compile(model) if cfg.train.compile else model
    optimizer = build_optimizer(net, cfg.optim)
    scaler = precision.grad_scaler()
    t, d = cfg.train, cfg.data
    mixup = Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, prob=t.mixup_prob,
                  switch_prob=t.mixup_switch_prob, mode=t.mixup_mode, label_smoothing=t.label_smoothing,
                  num_classes=cfg.model.num_classes) if t.mixup_alpha > 0 or t.cutmix_alpha > 0 else None
    erase = RandomErasing(d.re_prob, mode=d.re_mode, max_count=d.re_count, device=info.device) if d.re_prob else None
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile, the DDP wrapper inside it
    return TrainParts(
        model=model, net=net, criterion=_criterion(t, mixup is not None),
        optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.schedule, cfg.optim.lr),
        precision=precision, scaler=scaler, autocast=precision.autocast(), ema=ema, device=info.device,
        memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format,
        world_size=info.world_size, epochs=cfg.schedule.epochs,
        halt_on_nonfinite=not scaler.is_enabled(),  # fp16: the scaler skips non-finite steps instead
        log_interval=cfg.train.log_interval, max_bad_fraction=cfg.data.max_bad_fraction, erase=erase, mixup=mixup,
        accum=t.grad_accum_steps, clip_grad=t.clip_grad,
        no_sync=ddp.no_sync if isinstance(ddp, nn.parallel.DistributedDataParallel) else contextlib.nullcontext)


def _criterion(t: TrainConfig, mixed: bool) -> nn.Module:
    """Cross-entropy with label smoothing (the paper's, plain); under mixup timm's soft-target loss (the
    smoothing is in the mixed targets); with bce_loss timm's BinaryCrossEntropy."""
    if t.bce_loss:
        return BinaryCrossEntropy(smoothing=0.0 if mixed else t.label_smoothing)
    return SoftTargetCrossEntropy() if mixed else nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)


def train_one_epoch(parts: TrainParts, loader: TrainLoader, *, epoch: int, global_step: int, tracker: Tracker,
                    checkpointer: Checkpointer | None, stop: StopRequest,
                    carried: EpochSums | None = None) -> EpochResult:
    """Train on the loader's remaining batches of ``epoch`` (0-based) after ``global_step`` steps;
    ``carried``: the epoch's totals before a resume; ``checkpointer``: mid-epoch saves (None: none).
    A collective over equal loaders; a stop signal ends it at the same step on every process."""
    parts.model.train()
    batches = loader.batches_per_epoch
    batch = done = batches - len(loader)  # batches of this epoch trained before a resume
    meter = _Meter(parts, loader, epoch, batches, loader.progress(batch)[0], carried or EpochSums())
    stopped, lr = False, parts.optimizer.param_groups[0]["lr"]
    for batch, (images, targets, skipped, _) in enumerate(_iterate(loader), start=batch + 1):
        # an optimizer step per accum micro-batches from where this part of the epoch began; the epoch's last
        # step may have fewer
        first, last = (batch - 1 - done) % parts.accum == 0, (batch - done) % parts.accum == 0 or batch == batches
        if first:
            size = min(parts.accum, batches - batch + 1)
            start, end = loader.progress(batch - 1)[0], loader.progress(batch - 2 + size)[1]  # in samples
            lr = parts.scheduler.step(start, end)
        loss = _forward_backward(parts, loader.normalize, images, targets, size, sync=last)
        meter.add(loss, images.shape[0], skipped)
        if not last:
            continue
        _optimizer_step(parts)
        global_step += 1
        if checkpointer is not None:
            checkpointer.check()  # a failed background write stops the run here
        if global_step % parts.log_interval == 0:
            meter.log(global_step, batch, lr, end, tracker)
        if stop.poll(checkpointer is not None and checkpointer.time_due()):  # the same answers on every process
            stopped = True
            break
        due = checkpointer is not None and (checkpointer.step_due(global_step) or stop.save_agreed)
        if due and batch < batches:  # the epoch end saves after validation
            sums = meter.totals(global_step)  # raises on a NaN / inf before anything is written
            checkpointer.save_mid(parts, loader, epoch, batch, global_step, sums)
    return meter.summary(global_step, parts.optimizer.param_groups[0]["lr"], batch, stopped)


def _forward_backward(parts: TrainParts, normalize: Normalize, images: torch.Tensor, targets: torch.Tensor,
                      micro: int, sync: bool) -> torch.Tensor:
    """Forward and backward of uint8 images (B, 3, H, W), one of ``micro`` micro-batches of a step (the loss
    scaled to their mean); ``sync``: the step's last, where DDP reduces the gradients. Returns the detached
    loss () without reading it on the host."""
    images = normalize(images.to(parts.device, non_blocking=True), parts.memory_format)  # float32 on the device
    targets = targets.to(parts.device, non_blocking=True)  # (B,)
    if parts.erase is not None:
        images = parts.erase(images)
    if parts.mixup is not None:
        images, targets = parts.mixup(images, targets)
    with contextlib.nullcontext() if sync else parts.no_sync():
        with parts.autocast:
            logits = parts.model(images)  # (B, num_classes)
            loss = parts.criterion(logits, targets)  # ()
        parts.scaler.scale(loss / micro if micro > 1 else loss).backward()
    return loss.detach()


def _optimizer_step(parts: TrainParts) -> None:
    if parts.clip_grad:
        parts.scaler.unscale_(parts.optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(parts.net.parameters(), parts.clip_grad)
    parts.scaler.step(parts.optimizer)  # an enabled scaler skips steps whose gradients overflowed
    parts.scaler.update()
    parts.ema.update(parts.net)
    parts.optimizer.zero_grad(set_to_none=True)


def _iterate(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, without touching the global RNG: a DataLoader draws its workers' base
    seed from it at the first batch, which would shift the dropout / drop-path stream of a run
    resumed mid-epoch (RNG restored, then a new iterator) against an uninterrupted one."""
    iterator = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(iterator, None)
    if first is None:
        return
    yield first
    yield from iterator


class _Meter:
    """Device-side sums of one epoch, read on the host only at log and save points."""

    def __init__(self, parts: TrainParts, loader: TrainLoader, epoch: int, batches: int, progress: float,
                 carried: EpochSums):
        self.parts, self.loader, self.epoch, self.batches = parts, loader, epoch, batches
        self.carried = carried  # the epoch's totals before this process's part of it (a resume)
        self.first_progress = progress  # epoch progress when this process's part of the epoch began
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=parts.device)  # finite losses only
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=parts.device)  # steps
        self.steps, self.images, self.skipped = 0, 0, 0  # this process, host counters
        self.start = time.perf_counter()
        self.last = (self.start, 0, 0, 0.0, 0.0)  # time, steps, images, loss sum, non-finite at the last log

    def add(self, loss: torch.Tensor, images: int, skipped: int) -> None:
        bad = ~torch.isfinite(loss)
        self.loss_sum += loss.masked_fill(bad, 0.0)
        self.nonfinite += bad
        self.steps, self.images, self.skipped = self.steps + 1, self.images + images, self.skipped + skipped

    def read(self, global_step: int, weights: bool = False, end: bool = False) -> tuple[float, float, float]:
        """The host sync: (loss sum, non-finite steps, skipped samples) of all processes in this part of
        the epoch; ``weights`` also checks every parameter is finite (before a save). Raises
        NonFiniteLossError, or BadDataError past the budget, on every process alike."""
        broken = (torch.stack([~torch.isfinite(p).all() for p in self.parts.net.parameters()]).any() if weights
                  else torch.zeros((), dtype=torch.bool, device=self.parts.device))
        skipped = torch.tensor(float(self.skipped), dtype=torch.float64, device=self.parts.device)
        local = torch.stack([self.loss_sum, self.nonfinite, skipped, broken.double()])
        loss_sum, nonfinite, skipped_all, broken_any = all_reduce_sum(local).tolist()
        if (nonfinite and self.parts.halt_on_nonfinite) or broken_any:
            what = f"weights after step {global_step}" if broken_any else \
                f"training loss in {nonfinite:.0f} step(s) up to step {global_step}"
            raise NonFiniteLossError(
                f"non-finite {what} (NaN or inf) in epoch {self.epoch}: stopping without saving, the last good "
                f"checkpoint is kept (lower optim.lr, or check the data)")
        images, bad = self.carried.images + self.images * self.parts.world_size, self.carried.skipped + skipped_all
        if (end or images >= BAD_WINDOW) and bad > self.parts.max_bad_fraction * images:
            self._stop_on_bad_data(bad, images)
        return loss_sum, nonfinite, skipped_all

    def totals(self, global_step: int, end: bool = False) -> EpochSums:
        """The epoch's totals so far (carried + this part), weights checked: before any save."""
        loss_sum, nonfinite, skipped = self.read(global_step, weights=True, end=end)
        world = self.parts.world_size
        return self.carried + EpochSums(loss_sum, self.steps * world, int(nonfinite), self.images * world,
                                        int(skipped), time.perf_counter() - self.start)

    def _stop_on_bad_data(self, bad: float, images: int) -> None:
        per_shard: collections.Counter = collections.Counter()
        for counts in all_gather_object(dict(self.loader.bad_shards)):
            per_shard.update(counts)
        worst = ", ".join(f"{os.path.basename(url)} ({n})" for url, n in per_shard.most_common(3))
        raise BadDataError(
            f"data.max_bad_fraction: {bad:.0f} bad samples for {images} images trained in epoch {self.epoch} "
            f"({bad / max(images, 1):.1%}, the limit is {self.parts.max_bad_fraction:.1%}); worst shards: {worst}; "
            "repair or remove them (the log names each bad sample), or raise data.max_bad_fraction")

    def log(self, global_step: int, batch: int, lr: float, progress: float, tracker: Tracker) -> None:
        loss_sum, nonfinite, _ = self.read(global_step)
        now = time.perf_counter()
        last_time, last_steps, last_images, last_sum, last_bad = self.last
        finite = (self.steps - last_steps) * self.parts.world_size - (nonfinite - last_bad)
        loss = (loss_sum - last_sum) / finite if finite else float("nan")
        ips = (self.images - last_images) * self.parts.world_size / max(now - last_time, 1e-9)
        # training steps only, from the pace of this epoch in samples (any world size)
        eta = (self.parts.epochs - progress) * (now - self.start) / max(progress - self.first_progress, 1e-9)
        self.last = (now, self.steps, self.images, loss_sum, nonfinite)
        logger.info("epoch %d/%d  batch %d/%d  step %d  loss %.4f  lr %.4g  %.0f img/s  eta %s",
                    self.epoch, self.parts.epochs, batch, self.batches, global_step, loss, lr, ips,
                    timedelta(seconds=round(eta)))
        tracker.log_step(global_step, {"loss": loss, "lr": lr, "images_per_s": ips, "epoch": progress})

    def summary(self, global_step: int, lr: float, batch: int, stopped: bool) -> EpochResult:
        sums = self.totals(global_step, end=not stopped)  # train.py saves after this
        finite = sums.losses - sums.nonfinite
        return EpochResult(train_loss=sums.loss_sum / finite if finite else float("nan"), lr=lr,
                           images_per_s=sums.images / max(sums.time_s, 1e-9), train_time_s=sums.time_s,
                           train_images=sums.images,
                           skipped=sums.skipped, nonfinite=sums.nonfinite, step=global_step, batch=batch,
                           stopped=stopped, sums=sums)
