"""The evaluation loader: every readable sample exactly once over all ranks and workers (docs/design.md §5.5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from hrnet_cls.data.remote import READ_TIMEOUT_S, RETRIES
from hrnet_cls.data.sources import Segment, SkipCounter, expand_urls, num_classes_of, read_info, read_segment
from hrnet_cls.data.sources import shard_lengths, warn
from hrnet_cls.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DecodeError,
    Normalize,
    eval_crop,
    eval_resize,
)
from hrnet_cls.data.workers import check_common, iterate, stop_workers


@dataclass(frozen=True)
class ValPlan:
    """Everything that determines one rank's evaluation batches."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    batch_size: int
    img_size: int
    resize: int  # shorter side before the centre crop, pixels
    rank: int
    world_size: int
    slots: int  # reader slots per rank = max(1, DataLoader workers)
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    retries: int = RETRIES  # of a remote read that is cut or stalls
    read_timeout_s: float = READ_TIMEOUT_S

    def slot_range(self, slot: int) -> tuple[int, int]:
        """[lo, hi) of the sequence of all samples read by this rank's ``slot``."""
        total, slots = sum(self.lengths), self.world_size * self.slots
        g = self.rank * self.slots + slot
        return total * g // slots, total * (g + 1) // slots

    def segments(self, slot: int) -> list[Segment]:
        lo, hi = self.slot_range(slot)
        out, pos = [], 0
        for url, n in zip(self.urls, self.lengths):
            if pos < hi and pos + n > lo:
                out.append(Segment(url, max(lo - pos, 0), min(hi - pos, n)))
            pos += n
        return out


def _val_slot_batches(plan: ValPlan, slot: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Batches of the slot's decodable samples. A full batch is held until the next one is
    cut, so skips met after it still reach the caller on the last batch."""
    skipped = SkipCounter()
    held: tuple[torch.Tensor, torch.Tensor] | None = None
    images = torch.empty(plan.batch_size, 3, plan.img_size, plan.img_size, dtype=torch.uint8)
    targets: list[int] = []
    for seg in plan.segments(slot):
        for key, data, target, _ in read_segment(seg, plan.num_classes, skipped, plan.retries, plan.read_timeout_s):
            try:
                pixels = eval_crop(data, plan.img_size, plan.resize, interpolation=plan.interpolation)
            except DecodeError as exc:
                warn("%s: sample %s: %s; skipped", seg.url, key, exc)
                skipped.add(seg.url)
                continue
            images[len(targets)] = pixels
            targets.append(target)
            if len(targets) == plan.batch_size:
                if held is not None:
                    yield (*held, skipped.n)
                    skipped.n = 0
                held, targets = (images, torch.tensor(targets)), []
                images = torch.empty_like(images)
    if targets:
        if held is not None:
            yield (*held, skipped.n)
            skipped.n = 0
        held = (images[:len(targets)], torch.tensor(targets))
    if held is None and skipped.n:
        held = (images[:0], torch.zeros(0, dtype=torch.int64))  # nothing decoded: report the skips anyway
    if held is not None:
        yield (*held, skipped.n)


class _ValStream(IterableDataset):
    def __init__(self, plan: ValPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        yield from _val_slot_batches(self.plan, info.id if info is not None else 0)


class ValLoader:
    """One rank's share of the evaluation samples as ``(images, targets, skipped)``."""

    def __init__(self, plan: ValPlan, workers: int, pin_memory: bool = False) -> None:
        self.plan, self.workers, self.pin_memory = plan, workers, pin_memory
        self.normalize = Normalize(plan.mean, plan.std)  # on the device, after the batch's copy there

    def __len__(self) -> int:
        """Batches this rank yields when no sample is bad."""
        sizes = (hi - lo for lo, hi in map(self.plan.slot_range, range(self.plan.slots)))
        return sum(-(-n // self.plan.batch_size) for n in sizes)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        batches = iterate(_ValStream(self.plan), self.workers, self.pin_memory)
        try:
            for images, targets, skipped in batches:
                yield images, targets, int(skipped)
        finally:
            stop_workers(batches)  # now, also when an error ends the pass early


def build_val_loader(urls: str | Sequence[str], *, batch_size: int, img_size: int, crop_pct: float,
                     rank: int = 0, world_size: int = 1, workers: int = 2,
                     mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                     interpolation: str = "bilinear", num_classes: int | None = None,
                     retries: int = RETRIES, read_timeout_s: float = READ_TIMEOUT_S,
                     pin_memory: bool = False) -> ValLoader:
    """Evaluation batches (shorter side to eval_resize(img_size, crop_pct), centre crop img_size); a worker's
    last batch may be short, and a worker whose every sample was bad yields one empty batch with its skips."""
    check_common(batch_size, img_size, rank, world_size, workers, interpolation)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]")
    shard_urls = expand_urls(urls)
    info = read_info(shard_urls)
    plan = ValPlan(tuple(shard_urls), tuple(shard_lengths(shard_urls)), batch_size, img_size,
                   eval_resize(img_size, crop_pct), rank, world_size, max(1, workers),
                   num_classes_of(info, num_classes), tuple(mean), tuple(std), interpolation, retries,
                   read_timeout_s)
    return ValLoader(plan, workers, pin_memory)
