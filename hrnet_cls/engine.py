"""One training epoch and one evaluation pass (DeiT's main.py / engine.py split).

``train_one_epoch`` and ``evaluate`` return dicts of metrics averaged over every step and
every process. What a recipe chooses (loss, precision, EMA, LR schedule, DDP, compile) lives
in the objects of :class:`TrainParts`, built once by train.py: the loop never branches on it.

Host syncs: the loop reads no device value per step. The loss sum and a count of non-finite
losses stay on the device and are read (one all_reduce, one copy to the host) every
``log_interval`` steps, before each mid-epoch checkpoint and at the epoch end. A non-finite
loss is thus noticed at the next of those points, always before anything is saved, so the
last good checkpoint is never overwritten with NaN weights. (Under fp16, GradScaler itself
reads its overflow flag every step unless the optimizer is fused; that is the scaler's cost.)
"""
from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hrnet_cls.data import TrainLoader, accuracy_counts, all_reduce_counts
from hrnet_cls.distributed import all_reduce_sum, is_distributed
from hrnet_cls.ema import NoEma
from hrnet_cls.optim import StepSchedule
from hrnet_cls.tracking import Tracker

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, int]  # images (B, 3, H, W), targets (B,), skipped samples
SaveFn = Callable[[int, int, int], None]  # save(epoch, batch_in_epoch, global_step); a collective


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite on some process; raised on every process."""


@dataclass
class TrainParts:
    """The objects of one optimizer step, built once from the config by train.py."""

    model: nn.Module  # forward/backward runs through this: the bare model or its DDP / compile wrapper
    net: nn.Module  # the bare model: what the EMA follows and checkpoints store
    criterion: nn.Module  # logits (B, C), targets (B,) -> mean loss ()
    optimizer: torch.optim.Optimizer
    scheduler: StepSchedule  # sets the lr of optimizer step k: a pure function of k
    scaler: torch.amp.GradScaler  # loss scaling; enabled for fp16 only
    autocast: AbstractContextManager  # torch.autocast(device, dtype); disabled for fp32
    ema: nn.Module | NoEma  # ModelEmaV3 or NoEma: update(net) after every step
    device: torch.device
    memory_format: torch.memory_format  # of the input batches: channels_last or contiguous
    world_size: int  # processes; images per step = batch x world_size
    epochs: int  # of the whole run, for the log line and the ETA
    halt_on_nonfinite: bool  # stop on a NaN/inf loss; False under fp16, whose scaler skips those steps
    log_interval: int  # optimizer steps between log lines (and host syncs)
    save_interval: int  # optimizer steps between mid-epoch checkpoints; 0 = none


def train_one_epoch(parts: TrainParts, loader: TrainLoader, *, epoch: int, global_step: int,
                    tracker: Tracker, save: SaveFn) -> dict[str, float]:
    """Train on the loader's remaining batches of ``epoch`` (0-based); ``global_step`` =
    optimizer steps taken before them. Every process must call it with equal loaders.

    Returns train_loss (mean over finite steps of all processes), lr (of the last step),
    step (after the epoch), images_per_s (all processes), train_time_s, skipped (bad
    samples, all processes) and nonfinite (steps with a NaN/inf loss, all processes).
    """
    parts.model.train()
    batches = loader.batches_per_epoch
    first = batches - len(loader)  # batches of this epoch trained before a resume
    meter = _Meter(parts, epoch, global_step, batches)
    for batch, (images, targets, skipped) in enumerate(_iterate(loader), start=first + 1):
        lr = parts.scheduler.step(global_step)
        loss = _train_step(parts, images, targets)
        global_step += 1
        meter.add(loss, images.shape[0], skipped)
        if global_step % parts.log_interval == 0:
            meter.log(global_step, batch, lr, tracker)
        if _due(global_step, parts.save_interval) and batch < batches:  # the epoch end saves after validation
            meter.read(global_step, weights=True)  # raises on a NaN / inf before anything is written
            save(epoch, batch, global_step)
    return meter.summary(global_step, parts.optimizer.param_groups[0]["lr"])


def _train_step(parts: TrainParts, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One optimizer step; returns the detached loss () without reading it on the host."""
    images = images.to(parts.device, non_blocking=True, memory_format=parts.memory_format)  # (B, 3, H, W)
    targets = targets.to(parts.device, non_blocking=True)  # (B,)
    with parts.autocast:
        logits = parts.model(images)  # (B, num_classes)
        loss = parts.criterion(logits, targets)  # ()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)  # an enabled scaler skips steps whose gradients overflowed
    parts.scaler.update()
    parts.ema.update(parts.net)
    return loss.detach()


def _due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _iterate(loader: Iterable[Batch]) -> Iterator[Batch]:
    """The loader's batches, without touching the global RNG.

    A DataLoader draws its workers' base seed from the global torch RNG when its iterator
    starts (at the first batch). Our batches do not depend on it (hrnet_cls.data seeds each
    sample), but the draw would shift the dropout / drop-path stream, and a run resumed
    mid-epoch (RNG restored, then a new iterator) would differ from an uninterrupted one.
    """
    iterator = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(iterator, None)
    if first is None:
        return
    yield first
    yield from iterator


class _Meter:
    """Device-side sums of one epoch, read on the host only at log and save points."""

    def __init__(self, parts: TrainParts, epoch: int, global_step: int, batches: int):
        self.parts, self.epoch, self.first_step, self.batches = parts, epoch, global_step, batches
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

    def read(self, global_step: int, weights: bool = False) -> tuple[float, float, float]:
        """(loss sum, non-finite steps, skipped samples) of all processes: the host sync.

        weights: also check that every parameter is finite (before a checkpoint: the last
        step's update can break the weights while its loss was still finite). Raises
        NonFiniteLossError on every process alike (they all see the same sums)."""
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
        return loss_sum, nonfinite, skipped_all

    def log(self, global_step: int, batch: int, lr: float, tracker: Tracker) -> None:
        loss_sum, nonfinite, _ = self.read(global_step)
        now = time.perf_counter()
        last_time, last_steps, last_images, last_sum, last_bad = self.last
        finite = (self.steps - last_steps) * self.parts.world_size - (nonfinite - last_bad)
        loss = (loss_sum - last_sum) / finite if finite else float("nan")
        ips = (self.images - last_images) * self.parts.world_size / max(now - last_time, 1e-9)
        total = self.parts.epochs * self.batches
        eta = (total - global_step) * (now - self.start) / self.steps  # training steps only
        self.last = (now, self.steps, self.images, loss_sum, nonfinite)
        logger.info("epoch %d/%d  batch %d/%d  step %d  loss %.4f  lr %.4g  %.0f img/s  eta %s",
                    self.epoch, self.parts.epochs, batch, self.batches, global_step, loss, lr, ips,
                    timedelta(seconds=round(eta)))
        tracker.log_step(global_step, {"loss": loss, "lr": lr, "images_per_s": ips,
                                       "epoch": global_step / self.batches})

    def summary(self, global_step: int, lr: float) -> dict[str, float]:
        loss_sum, nonfinite, skipped = self.read(global_step, weights=True)  # train.py saves after this
        elapsed = time.perf_counter() - self.start
        finite = self.steps * self.parts.world_size - nonfinite
        return {"train_loss": loss_sum / finite if finite else float("nan"), "lr": lr, "step": global_step,
                "images_per_s": self.images * self.parts.world_size / max(elapsed, 1e-9),
                "train_time_s": elapsed, "skipped": int(skipped), "nonfinite": int(nonfinite)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], *, device: torch.device,
             autocast: AbstractContextManager,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """Exact top-1 / top-5 (%) and mean cross-entropy of ``model`` over the whole validation set.

    Pass the bare model, not DDP. Each process runs its share of the samples (the val loader
    reads every sample exactly once over all processes); integer hit counts and loss sums
    are added over processes, so any number of processes gives the 1-process numbers. The
    loss is plain cross-entropy (no label smoothing). Buffers (BN statistics) are first made
    rank 0's, which the checkpoint stores. Returns top1, top5, loss, samples, skipped.
    """
    broadcast_buffers(model)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # [top-1 hits, top-5 hits, samples]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    skipped = 0
    for images, targets, bad in _iterate(loader):
        skipped += bad
        if targets.numel() == 0:  # a worker whose samples were all unreadable reports its skips only
            continue
        images = images.to(device, non_blocking=True, memory_format=memory_format)  # (B, 3, H, W)
        targets = targets.to(device, non_blocking=True)  # (B,)
        with autocast:
            logits = model(images)  # (B, num_classes)
        loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum")
        counts += accuracy_counts(logits, targets)
    model.train(was_training)
    top1, top5, n = all_reduce_counts(counts).tolist()
    extra = torch.stack([loss_sum, torch.tensor(float(skipped), dtype=torch.float64, device=device)])
    loss_total, skipped_total = all_reduce_sum(extra).tolist()
    return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1),
            "loss": loss_total / max(n, 1), "samples": n, "skipped": int(skipped_total)}


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers. Under DDP each process last updated its BN running
    statistics from its own batch; validate (and keep training from) the ones rank 0 saves."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
