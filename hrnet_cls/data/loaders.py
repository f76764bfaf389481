"""Training and evaluation loaders over shards; the design is described in hrnet_cls.data."""
from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hrnet_cls.data.sources import (
    RawSample,
    Segment,
    SkipCounter,
    chunks,
    expand_urls,
    num_classes_of,
    read_info,
    read_segment,
    shard_lengths,
    shuffle_buffer,
    warn,
)
from hrnet_cls.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    INTERPOLATIONS,
    Normalizer,
    eval_crop,
    sample_rng,
    train_crop,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainPlan:
    """Everything that determines one rank's training batches for one epoch."""

    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    batch_size: int
    img_size: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    slots: int  # reader slots per rank = max(1, DataLoader workers)
    start_batch: int
    buffer: int
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float

    @property
    def batches(self) -> int:
        """Batches per rank per epoch: the same on every rank."""
        return sum(self.lengths) // (self.batch_size * self.world_size)

    def slot_batches(self, slot: int) -> int:
        """Rank batches b in [0, batches) with b % slots == slot."""
        return max(0, (self.batches - slot + self.slots - 1) // self.slots)

    def slot_start(self, slot: int) -> int:
        """Position of the slot's stretch in this epoch's sequence of samples."""
        before = self.rank * self.batches + sum(self.slot_batches(s) for s in range(slot))
        return before * self.batch_size

    def shard_order(self) -> list[int]:
        order = list(range(len(self.urls)))
        sample_rng(self.seed, self.epoch, "shards").shuffle(order)
        return order


def _cyclic_segments(plan: TrainPlan, start: int) -> Iterator[Segment]:
    """Segments from ``start`` on in the epoch's shard sequence, wrapping around forever."""
    order = [i for i in plan.shard_order() if plan.lengths[i] > 0]
    pos = 0
    for first, i in enumerate(order):
        if pos + plan.lengths[i] > start:
            yield Segment(plan.urls[i], start - pos, plan.lengths[i])
            break
        pos += plan.lengths[i]
    while True:
        for i in order[first + 1:] + order[:first + 1]:
            yield Segment(plan.urls[i], 0, plan.lengths[i])


def _slot_stream(plan: TrainPlan, slot: int, skipped: SkipCounter) -> Iterator[RawSample]:
    """Exactly the slot's quota of usable samples, read from its stretch on."""
    quota = plan.slot_batches(slot) * plan.batch_size
    got, fruitless = 0, 0
    if quota == 0:
        return
    for seg in _cyclic_segments(plan, plan.slot_start(slot)):
        before = got
        for raw in read_segment(seg, plan.num_classes, skipped):
            yield raw
            got += 1
            if got == quota:
                return
        fruitless = 0 if got > before else fruitless + 1
        if fruitless > len(plan.urls):  # a whole lap without one usable sample
            raise RuntimeError(f"no usable sample in any of the {len(plan.urls)} training shards "
                               f"(e.g. {plan.urls[0]}); check the files")


def _decode_train_batch(chunk: list[RawSample], plan: TrainPlan,
                        normalize: Normalizer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images (B, 3, S, S) float32, targets (B,) int64, images that failed to decode)."""
    images = torch.empty(len(chunk), 3, plan.img_size, plan.img_size)
    targets = torch.tensor([target for _, _, target in chunk], dtype=torch.int64)
    kw = dict(scale=plan.scale, ratio=plan.ratio, hflip=plan.hflip, interpolation=plan.interpolation)
    good, failed = [], []
    for i, (key, data, _) in enumerate(chunk):
        try:
            normalize(train_crop(data, plan.img_size, sample_rng(plan.seed, plan.epoch, key), **kw), images[i])
            good.append(i)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            warn("sample %s: image does not decode (%r); replaced by another of its batch", key, exc)
            failed.append(i)
    for n, i in enumerate(failed):
        if not good:  # the whole batch is undecodable: black images keep the batch shape
            normalize(torch.zeros(3, plan.img_size, plan.img_size, dtype=torch.uint8), images[i])
            continue
        key, data, target = chunk[good[n % len(good)]]
        rng = sample_rng(plan.seed, plan.epoch, key, n + 1)  # a different crop of the donor
        normalize(train_crop(data, plan.img_size, rng, **kw), images[i])
        targets[i] = target
    return images, targets, len(failed)


def _slot_batches(plan: TrainPlan, slot: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int]]:
    """(rank batch index, images, targets, skipped) for one slot, from start_batch on."""
    skipped = SkipCounter()
    rng = sample_rng(plan.seed, plan.epoch, plan.rank, slot, "buffer")
    stream = shuffle_buffer(_slot_stream(plan, slot, skipped), plan.buffer, rng)
    normalize = Normalizer(plan.mean, plan.std)
    first = max(0, -(-(plan.start_batch - slot) // plan.slots))  # local batches before start_batch
    reported = 0
    for local, chunk in enumerate(chunks(stream, plan.batch_size)):
        # skips are charged to the batch whose reading met them: the same with or without resume
        new_skips, reported = skipped.n - reported, skipped.n
        if local < first:
            continue  # cut from raw bytes, never decoded
        images, targets, failed = _decode_train_batch(chunk, plan, normalize)
        yield local * plan.slots + slot, images, targets, new_skips + failed


class _TrainStream(IterableDataset):
    def __init__(self, plan: TrainPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # DataLoader asks workers 0, 1, ... in turn: worker 0 must hold batch start_batch
        yield from _slot_batches(self.plan, (worker + self.plan.start_batch) % self.plan.slots)


# Workers are forked on Linux even where the process itself was spawned (mp.spawn sets
# "spawn" as the default): a spawned worker re-imports torch and timm, 5-20 s per worker
# per epoch. The workers touch no CUDA state.
_WORKER_START = "fork" if sys.platform.startswith("linux") else None


def _loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> Iterable:
    if workers == 0:
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      multiprocessing_context=_WORKER_START)


class TrainLoader:
    """One rank's training batches for one epoch: ``(images, targets, skipped)``.

    ``len()`` is the number of batches still to come (batches_per_epoch - start_batch),
    the same on every rank. ``set_epoch`` re-targets the loader to another epoch.
    """

    def __init__(self, plan: TrainPlan, workers: int, pin_memory: bool = False) -> None:
        self.plan, self.workers, self.pin_memory = plan, workers, pin_memory

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        _check_start(start_batch, self.plan.batches)
        self.plan = dataclasses.replace(self.plan, epoch=epoch, start_batch=start_batch)

    def __len__(self) -> int:
        return self.plan.batches - self.plan.start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        expected, held = self.plan.start_batch, {}
        for index, images, targets, skipped in _loader(_TrainStream(self.plan), self.workers, self.pin_memory):
            held[index] = (images, targets, int(skipped))
            while expected in held:  # the round robin already yields in order; this guards it
                yield held.pop(expected)
                expected += 1
        if expected != self.plan.batches:
            raise RuntimeError(f"training loader stopped at batch {expected} of {self.plan.batches}")


def _check_start(start_batch: int, batches: int) -> None:
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch={start_batch} outside 0..{batches} (batches per epoch)")


def _check_common(batch_size: int, img_size: int, rank: int, world_size: int, workers: int,
                  interpolation: str) -> None:
    if batch_size < 1 or img_size < 1:
        raise ValueError(f"batch_size={batch_size} and img_size={img_size} must be positive")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in 0..world_size-1 (world_size={world_size})")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: expected one of {INTERPOLATIONS}")


def build_train_loader(urls: str | Sequence[str], *, batch_size: int, img_size: int, seed: int, epoch: int,
                       rank: int = 0, world_size: int = 1, workers: int = 2, start_batch: int = 0,
                       mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                       shuffle_buffer: int = 1000, num_classes: int | None = None,
                       interpolation: str = "bilinear", scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                       pin_memory: bool = False) -> TrainLoader:
    """Training batches of RandomResizedCrop(img_size) + flip + normalise for one rank.

    ``start_batch=k`` yields batches k, k+1, ... of the epoch, bit-identical to those of an
    uninterrupted run (resume after a kill). ``num_classes`` (default: from _info.json)
    bounds valid labels; ``shuffle_buffer`` is in samples per worker (memory: that many
    encoded images, ~110 KB each for ImageNet).
    """
    _check_common(batch_size, img_size, rank, world_size, workers, interpolation)
    shard_urls = expand_urls(urls)
    info = read_info(shard_urls)
    plan = TrainPlan(tuple(shard_urls), tuple(shard_lengths(shard_urls)), batch_size, img_size, seed,
                     epoch, rank, world_size, max(1, workers), start_batch, max(1, shuffle_buffer),
                     num_classes_of(info, num_classes), tuple(mean), tuple(std), interpolation,
                     tuple(scale), tuple(ratio), hflip)
    if plan.batches == 0:
        raise ValueError(f"{sum(plan.lengths)} training samples in {urls!r} fill no batch of {batch_size} "
                         f"on each of {world_size} process(es); lower the batch size")
    _check_start(start_batch, plan.batches)
    if len(shard_urls) < world_size * plan.slots:
        logger.info("%d training shards for %d reader slots (processes x workers): slots share shards, "
                    "each reading its own part", len(shard_urls), world_size * plan.slots)
    return TrainLoader(plan, workers, pin_memory)


# ---------------------------------------------------------------- evaluation


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
    skipped, normalize = SkipCounter(), Normalizer(plan.mean, plan.std)
    held: tuple[torch.Tensor, torch.Tensor] | None = None
    images = torch.empty(plan.batch_size, 3, plan.img_size, plan.img_size)
    targets: list[int] = []
    for seg in plan.segments(slot):
        for key, data, target in read_segment(seg, plan.num_classes, skipped):
            try:
                pixels = eval_crop(data, plan.img_size, plan.resize, interpolation=plan.interpolation)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
                warn("sample %s: image does not decode (%r); skipped", key, exc)
                skipped.n += 1
                continue
            normalize(pixels, images[len(targets)])
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

    def __len__(self) -> int:
        """Batches this rank yields when no sample is bad."""
        sizes = (hi - lo for lo, hi in map(self.plan.slot_range, range(self.plan.slots)))
        return sum(-(-n // self.plan.batch_size) for n in sizes)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for images, targets, skipped in _loader(_ValStream(self.plan), self.workers, self.pin_memory):
            yield images, targets, int(skipped)


def build_val_loader(urls: str | Sequence[str], *, batch_size: int, img_size: int, crop_pct: float,
                     rank: int = 0, world_size: int = 1, workers: int = 2,
                     mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                     interpolation: str = "bilinear", num_classes: int | None = None,
                     pin_memory: bool = False) -> ValLoader:
    """Evaluation batches: shorter side to round(img_size / crop_pct), centre crop img_size.

    Every readable sample is yielded exactly once over all ranks and workers; a batch may be
    short (the last of a worker), and a worker whose every sample was bad yields one empty
    batch carrying its skip count.
    """
    _check_common(batch_size, img_size, rank, world_size, workers, interpolation)
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must lie in (0, 1]")
    shard_urls = expand_urls(urls)
    info = read_info(shard_urls)
    plan = ValPlan(tuple(shard_urls), tuple(shard_lengths(shard_urls)), batch_size, img_size,
                   round(img_size / crop_pct), rank, world_size, max(1, workers),
                   num_classes_of(info, num_classes), tuple(mean), tuple(std), interpolation)
    return ValLoader(plan, workers, pin_memory)
