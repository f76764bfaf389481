"""Exact evaluation of several models on one stream of decoded batches: train-time validation and validate.py.

Each batch is decoded once and fed to every model; integer counts are reduced once (docs/design.md §4.9)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hrnet_cls.data.transforms import Normalize
from hrnet_cls.distributed import all_reduce_sum
from hrnet_cls.errors import one_line
from hrnet_cls.precision import Precision
from hrnet_cls.timing import Stopwatch


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """int64 [top-k hits for each k (k > C counts as C)] on the logits' device; logits (N, C), targets (N,)."""
    maxk = min(max(topk), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(targets.view(-1, 1))  # (N, maxk)
    return torch.stack([hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk]).to(torch.int64)


@dataclass
class Tally:
    """One process's sums for the models of one stream (before the reduction)."""

    hits: torch.Tensor  # int64 (models, 2) on the device: top-1, top-5
    loss_sum: torch.Tensor  # float64 (models,) on the device: summed cross-entropy
    samples: list[int]  # per model, counted on the host (no copy to the device per batch)
    seconds: list[float]  # forward time per model (0 unless timed)
    errors: list[str]  # per model; "" = fine
    timed_samples: list[int] = field(default_factory=list)  # per model: the samples ``seconds`` covers
    shapes: list[set] = field(default_factory=list)  # per model: the batch shapes it has run
    decoded: int = 0  # samples fed
    skipped: int = 0  # bad samples the loader reported


@dataclass
class Totals:
    """Sums over every process."""

    counts: list[list[int]]  # per model: [top-1 hits, top-5 hits, samples]
    loss_sum: list[float]
    decoded: int
    skipped: int
    metrics: list[dict[str, float]] = field(default_factory=list)  # per model: top1, top5 (%), loss, samples


def feed(models: Sequence[nn.Module], batches: Iterable, *, normalize: Normalize, device: torch.device,
         precision: Precision,
         memory_format: torch.memory_format = torch.contiguous_format, timed: bool = False,
         catch: bool = False, compiled: bool = False) -> Tally:
    """Run every batch ``(uint8 images (B,3,S,S), targets (B,), skipped)`` through every model, normalised on ``device``.

    timed: synchronise after each forward to time it (host and device no longer overlap); ``compiled``: the first
    batch of each shape (a compile) is left out of the time. catch: a model that raises stops with its error
    kept, the others go on, a loader error fails all; else errors propagate."""
    tally = Tally(torch.zeros(len(models), 2, dtype=torch.int64, device=device),
                  torch.zeros(len(models), dtype=torch.float64, device=device),
                  [0] * len(models), [0.0] * len(models), [""] * len(models), [0] * len(models),
                  [set() for _ in models])
    try:
        for images, targets, bad in batches:
            tally.skipped += int(bad)
            tally.decoded += len(targets)
            if len(targets):  # an empty batch only reports bad samples
                images = normalize(images.to(device, non_blocking=True), memory_format)
                _forward_all(models, images, targets, tally, device, precision, timed, catch, compiled)
    except Exception as exc:  # noqa: BLE001 - the loader failed: every model of the stream fails
        if not catch:
            raise
        tally.errors = [e or f"reading the shards failed: {one_line(exc)}" for e in tally.errors]
    return tally


def _forward_all(models: Sequence[nn.Module], images: torch.Tensor, targets: torch.Tensor, tally: Tally,
                 device: torch.device, precision: Precision, timed: bool, catch: bool, compiled: bool) -> None:
    targets = targets.to(device, non_blocking=True)
    for i, model in enumerate(models):
        if tally.errors[i]:
            continue
        watch = Stopwatch(device if timed else "cpu")
        try:
            with watch, torch.inference_mode(), precision.autocast():
                logits = model(images).float()
                tally.loss_sum[i] += F.cross_entropy(logits, targets, reduction="sum")
                tally.hits[i] += accuracy_counts(logits, targets)
            tally.samples[i] += len(targets)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at this size: this model only
            if not catch:
                raise
            tally.errors[i] = f"forward failed: {one_line(exc)}"
        compiling = compiled and images.shape not in tally.shapes[i]
        tally.shapes[i].add(images.shape)
        if timed and not compiling:
            tally.seconds[i] += watch.seconds
            tally.timed_samples[i] += len(targets)


def reduce(tally: Tally) -> Totals:
    """Sum a tally over processes: one all_reduce for the integer counts, one for the losses."""
    n = tally.hits.shape[0]
    host = torch.tensor([*tally.samples, tally.decoded, tally.skipped], dtype=torch.int64, device=tally.hits.device)
    ints = all_reduce_sum(torch.cat([tally.hits.flatten(), host])).tolist()
    losses = all_reduce_sum(tally.loss_sum.clone()).tolist()
    counts = [[*ints[2 * i:2 * i + 2], ints[2 * n + i]] for i in range(n)]
    metrics = []
    for (top1, top5, samples), loss in zip(counts, losses):
        d = max(samples, 1)
        metrics.append({"top1": 100.0 * top1 / d, "top5": 100.0 * top5 / d, "loss": loss / d, "samples": samples})
    return Totals(counts, losses, ints[-2], ints[-1], metrics)


def evaluate(models: dict[str, nn.Module], batches: Iterable, *, normalize: Normalize, device: torch.device,
             precision: Precision, memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """``{name}_{top1,top5,loss,samples,skipped}`` for each named model, one decode of the data.

    Bare models (not DDP), run in eval mode and put back in their mode; the loss is plain cross-entropy."""
    names, nets = list(models), list(models.values())
    modes = [net.training for net in nets]
    for net in nets:
        net.eval()
    try:
        totals = reduce(feed(nets, batches, normalize=normalize, device=device, precision=precision,
                             memory_format=memory_format))
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)
    out: dict[str, float] = {}
    for name, metrics in zip(names, totals.metrics):
        out |= {f"{name}_{k}": v for k, v in metrics.items()} | {f"{name}_skipped": totals.skipped}
    return out

