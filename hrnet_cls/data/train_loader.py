"""The training loader: a deterministic, resumable plan of one epoch's batches per rank (docs/design.md §5.3,
§5.4). A sample's *position* (its index in the epoch's permuted shard sequence) depends on neither world size
nor workers, so any layout can continue an interrupted epoch from the set of positions trained on."""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from hrnet_cls.data.augment import augment_crop, build_augment
from hrnet_cls.data.remote import READ_TIMEOUT_S, RETRIES
from hrnet_cls.data.sources import (
    RawSample,
    Segment,
    SkipCounter,
    checked_lengths,
    chunks,
    expand_urls,
    num_classes_of,
    read_info,
    read_segment,
    shuffle_buffer,
    warn,
)
from hrnet_cls.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DecodeError,
    Normalize,
    sample_rng,
    train_crop,
)
from hrnet_cls.data.workers import check_common, iterate, stop_workers

logger = logging.getLogger(__name__)

# images (B, 3, S, S), targets (B,), skipped samples, positions (B,) int64 numpy (host-side: reading costs no sync)
TrainBatch = tuple[torch.Tensor, torch.Tensor, int, np.ndarray]


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
    auto_augment: str = ""  # timm's policy string, applied to each crop ("" = none)
    color_jitter: float = 0.0
    retries: int = RETRIES  # of a remote read that is cut or stalls
    read_timeout_s: float = READ_TIMEOUT_S
    exclude: bytes = b""  # np.packbits of the positions already trained on ("" = none): a remainder plan
    short: tuple[tuple[str, int], ...] = ()  # (shard, listed samples it lacks): charged to rank 0's batch 0

    @property
    def samples(self) -> int:
        """Positions in the epoch's sequence."""
        return sum(self.lengths)

    def excluded(self) -> np.ndarray:
        """bool (samples,): positions this plan leaves out."""
        if not self.exclude:
            return np.zeros(self.samples, dtype=bool)
        return np.unpackbits(np.frombuffer(self.exclude, dtype=np.uint8), count=self.samples).astype(bool)

    @functools.cached_property
    def before(self) -> int:
        """Samples of the epoch trained on before this plan (those it excludes)."""
        return int(self.excluded().sum()) if self.exclude else 0

    @property
    def batches(self) -> int:
        """Batches per rank in this plan: the same on every rank."""
        return (self.samples - self.before) // (self.batch_size * self.world_size)

    def slot_batches(self, slot: int) -> int:
        """Rank batches b in [0, batches) with b % slots == slot."""
        return max(0, (self.batches - slot + self.slots - 1) // self.slots)

    def reads(self, slot: int) -> list[tuple[int, int]]:
        """Position ranges [start, stop) the slot reads: its stretch, then its share of the spare (disjoint)."""
        pairs, pair = self.world_size * self.slots, self.rank * self.slots + slot
        first = (self.rank * self.batches + sum(self.slot_batches(s) for s in range(slot))) * self.batch_size
        used = self.batches * self.batch_size * self.world_size
        spare = self.samples - self.before - used
        ranges = [(first, first + self.slot_batches(slot) * self.batch_size),
                  (used + pair * spare // pairs, used + (pair + 1) * spare // pairs)]
        if self.exclude:  # counted among the positions not excluded
            available = np.append(np.flatnonzero(~self.excluded()), self.samples)
            ranges = [(int(available[a]), int(available[b - 1]) + 1 if b > a else int(available[a]))
                      for a, b in ranges]
        return [(a, b) for a, b in ranges if b > a]

    def shard_order(self) -> list[int]:
        order = list(range(len(self.urls)))
        sample_rng(self.seed, self.epoch, "shards").shuffle(order)
        return order

    def shard_of(self, position: int) -> str:
        return next(s.url for s in _segments(self, position, position + 1))


def _segments(plan: TrainPlan, start: int, stop: int) -> Iterator[Segment]:
    """The shard stretches holding positions [start, stop) of the epoch's sequence, in order."""
    base = 0
    for i in plan.shard_order():
        if base < stop and start < base + plan.lengths[i]:
            yield Segment(plan.urls[i], max(0, start - base), min(plan.lengths[i], stop - base), base)
        base += plan.lengths[i]


def _slot_stream(plan: TrainPlan, slot: int, skipped: SkipCounter) -> Iterator[RawSample]:
    """Exactly the slot's quota of samples from its own positions (plan.reads), less excluded and bad ones;
    if still short, other crops of its last good samples (position -1)."""
    quota = plan.slot_batches(slot) * plan.batch_size
    excluded = plan.excluded() if plan.exclude else None
    recent: collections.deque[RawSample] = collections.deque(maxlen=plan.batch_size)
    if quota == 0:
        return
    for start, stop in plan.reads(slot):
        for seg in _segments(plan, start, stop):
            for raw in read_segment(seg, plan.num_classes, skipped, plan.retries, plan.read_timeout_s):
                if excluded is None or not excluded[raw[3]]:
                    yield raw
                    recent.append(raw)
                    quota -= 1
                    if quota == 0:
                        return
    if not recent:
        names = sorted({seg.url for a, b in plan.reads(slot) for seg in _segments(plan, a, b)})
        raise RuntimeError(f"no usable sample in the {len(names)} training shard(s) read by rank {plan.rank}, "
                           f"reader {slot} (e.g. {names[0] if names else '-'}); check the files")
    warn("rank %d reader %d: %d samples short after its own share of the epoch; filled with other crops "
         "of its last good samples", plan.rank, slot, quota)
    for n in range(quota):
        key, data, target, _ = recent[n % len(recent)]
        yield f"{key}#{n + 1}", data, target, -1


def _decode_train_batch(chunk: list[RawSample], plan: TrainPlan, augment: Callable | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, list[int], np.ndarray]:
    """(images uint8 (B, 3, S, S), targets (B,), positions that failed to decode, positions (B,)); only DecodeError
    caught."""
    images = torch.empty(len(chunk), 3, plan.img_size, plan.img_size, dtype=torch.uint8)
    targets = torch.tensor([raw[2] for raw in chunk], dtype=torch.int64)
    positions = np.array([raw[3] for raw in chunk], dtype=np.int64)
    kw = dict(scale=plan.scale, ratio=plan.ratio, hflip=plan.hflip, interpolation=plan.interpolation)

    def crop(data: bytes, rng: random.Random) -> torch.Tensor:  # the same rng draws the augmentation after the box
        out = train_crop(data, plan.img_size, rng, **kw)
        return out if augment is None else augment_crop(out, augment, rng.getrandbits(63))
    good, failed = [], []
    for i, (key, data, _, _) in enumerate(chunk):
        try:
            images[i] = crop(data, sample_rng(plan.seed, plan.epoch, key))
            good.append(i)
        except DecodeError as exc:
            warn("sample %s: %s; replaced by another of its batch", key, exc)
            failed.append(i)
    for n, i in enumerate(failed):
        if not good:  # the whole batch is undecodable: black images keep the batch shape
            images[i] = 0
            continue
        key, data, target, _ = chunk[good[n % len(good)]]
        rng = sample_rng(plan.seed, plan.epoch, key, n + 1)  # a different crop of the donor
        images[i] = crop(data, rng)
        targets[i] = target
    return images, targets, [int(p) for p in positions[failed] if p >= 0], positions


def _slot_batches(plan: TrainPlan, slot: int) -> Iterator[tuple[int, tuple]]:
    """(rank batch index, batch) for one slot, from start_batch on."""
    skipped = SkipCounter()
    rng = sample_rng(plan.seed, plan.epoch, plan.rank, slot, "buffer")
    stream = shuffle_buffer(_slot_stream(plan, slot, skipped), plan.buffer, rng)
    augment = build_augment(plan.auto_augment, plan.color_jitter, plan.img_size, plan.mean, plan.interpolation)
    first = max(0, -(-(plan.start_batch - slot) // plan.slots))  # local batches before start_batch
    if slot == 0 and plan.rank == 0 and not plan.exclude:
        for url, n in plan.short:  # charged to the epoch's batch 0, once over all ranks
            skipped.add(url, n)
    for local, chunk in enumerate(chunks(stream, plan.batch_size)):
        # skips are charged to the batch whose reading met them: the same with or without resume
        if local < first:
            skipped.take()  # cut from raw bytes, never decoded: its skips were reported before the resume
            continue
        images, targets, failed, positions = _decode_train_batch(chunk, plan, augment)
        for position in failed:
            skipped.add(plan.shard_of(position))
        bad, by_shard = skipped.take()
        # as bytes, or DataLoader makes a tensor of it: the training loop reads no tensor per step
        yield local * plan.slots + slot, (images, targets, bad, positions.tobytes(), by_shard)


class _TrainStream(IterableDataset):
    def __init__(self, plan: TrainPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[int, tuple]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # DataLoader asks workers 0, 1, ... in turn: worker 0 must hold batch start_batch
        yield from _slot_batches(self.plan, (worker + self.plan.start_batch) % self.plan.slots)


class TrainLoader:
    """One rank's training batches for one epoch: ``(images, targets, skipped, positions)``; ``len()``: batches
    still to come, the same on every rank. ``consumed`` (bool per position) marks batches as handed out."""

    def __init__(self, plan: TrainPlan, workers: int, pin_memory: bool = False) -> None:
        self.plan, self.workers, self.pin_memory = plan, workers, pin_memory
        self.normalize = Normalize(plan.mean, plan.std)  # on the device, after the batch's copy there
        self.consumed = plan.excluded()
        self.bad_shards: collections.Counter = collections.Counter()  # bad samples per shard, handed out so far

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches

    def set_epoch(self, epoch: int, start_batch: int = 0, consumed: np.ndarray | None = None,
                  exclude: np.ndarray | None = None) -> None:
        """Target ``epoch`` from ``start_batch`` on (``consumed``: what the batches before it trained on), or,
        with ``exclude``, a remainder plan over the positions not yet trained on (start_batch 0)."""
        packed = b"" if exclude is None else np.packbits(exclude).tobytes()
        plan = dataclasses.replace(self.plan, epoch=epoch, start_batch=0, exclude=packed)
        _check_start(start_batch, plan.batches)
        if exclude is not None and start_batch:
            raise ValueError("a remainder plan (exclude=...) starts at its batch 0")
        self.plan = dataclasses.replace(plan, start_batch=start_batch)
        self.consumed = plan.excluded() if consumed is None else consumed.copy()
        self.bad_shards.clear()

    def progress(self, batch: int) -> tuple[float, float]:
        """(epoch progress before, after) rank batch ``batch``: epoch + fraction of its samples trained on."""
        total = self.plan.before + self.plan.batches * self.plan.batch_size * self.plan.world_size
        step = self.plan.batch_size * self.plan.world_size
        done = self.plan.before + batch * step
        return self.plan.epoch + done / total, self.plan.epoch + (done + step) / total

    def layout(self) -> dict:
        """What fixes which batch holds which samples, besides seed and epoch."""
        p = self.plan
        return {"world_size": p.world_size, "slots": p.slots, "batch_size": p.batch_size,
                "shards": [[os.path.basename(u), n] for u, n in zip(p.urls, p.lengths)]}

    def packed_consumed(self) -> np.ndarray:
        """This rank's trained positions of the epoch as packed bits (uint8): what a save gathers."""
        return np.packbits(self.consumed)

    def state(self, packed: list[np.ndarray] | None) -> dict:
        """The data position for a checkpoint: this plan's layout, how many samples it excludes, and
        the union of every rank's ``packed_consumed()`` (None at an epoch end) as a uint8 tensor."""
        union = None if packed is None else torch.from_numpy(np.bitwise_or.reduce(packed))
        return {"layout": self.layout(), "before": self.plan.before, "consumed": union}

    def resume(self, epoch: int, batch_in_epoch: int, saved: dict | None) -> str:
        """Position the loader where a checkpoint stopped; returns how, in one line.

        Same layout: the same batches from batch_in_epoch on, bit-identical to an
        uninterrupted run. Another layout mid-epoch: a remainder plan over the samples of
        the epoch not trained on yet, so nothing is replayed or left out (beyond the last
        partial global batch), though batches are grouped differently.
        """
        if batch_in_epoch == 0 or saved is None or saved.get("consumed") is None:
            self.set_epoch(epoch, start_batch=batch_in_epoch)
            return f"epoch {epoch}, batch {batch_in_epoch}"
        theirs, ours = saved["layout"], self.layout()
        if theirs["shards"] != ours["shards"]:
            raise ValueError(f"data.train_shards: the checkpoint stopped inside epoch {epoch} of other shards "
                             f"({len(theirs['shards'])} named shards, {sum(n for _, n in theirs['shards'])} samples; "
                             f"now {len(ours['shards'])}, {self.plan.samples}); resume with the same shards")
        consumed = np.unpackbits(saved["consumed"].numpy(), count=self.plan.samples).astype(bool)
        if theirs == ours and saved["before"] == 0:
            self.set_epoch(epoch, start_batch=batch_in_epoch, consumed=consumed)
            return f"epoch {epoch}, batch {batch_in_epoch}"
        self.set_epoch(epoch, exclude=consumed)
        was = f"{theirs['world_size']} x {theirs['batch_size']} (workers {theirs['slots']})"
        now = f"{ours['world_size']} x {ours['batch_size']} (workers {ours['slots']})"
        return (f"epoch {epoch} part-way under another layout ({was} then, {now} now): training on its "
                f"{self.plan.samples - self.plan.before} samples not yet seen, {self.plan.batches} batches; exact "
                "in samples and lr, not bit-identical to an uninterrupted run")

    def __len__(self) -> int:
        return self.plan.batches - self.plan.start_batch

    def __iter__(self) -> Iterator[TrainBatch]:
        expected, held = self.plan.start_batch, {}
        batches = iterate(_TrainStream(self.plan), self.workers, self.pin_memory)
        try:
            for index, batch in batches:
                held[index] = batch
                while expected in held:  # the round robin already yields in order; this guards it
                    images, targets, skipped, packed, by_shard = held.pop(expected)
                    positions = np.frombuffer(packed, dtype=np.int64)
                    self.bad_shards.update(by_shard)
                    self.consumed[positions[positions >= 0]] = True  # -1: a fill-in (plan.reads)
                    yield images, targets, int(skipped), positions
                    expected += 1
        finally:
            stop_workers(batches)  # now, also when a stop or an error ends the epoch early
        if expected != self.plan.batches:
            raise RuntimeError(f"training loader stopped at batch {expected} of {self.plan.batches}")


def _check_start(start_batch: int, batches: int) -> None:
    if not 0 <= start_batch <= batches:
        raise ValueError(f"start_batch={start_batch} outside 0..{batches} (batches per epoch)")


def build_train_loader(urls: str | Sequence[str], *, batch_size: int, img_size: int, seed: int, epoch: int,
                       rank: int = 0, world_size: int = 1, workers: int = 2, start_batch: int = 0,
                       mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                       shuffle_buffer: int = 1000, num_classes: int | None = None,
                       interpolation: str = "bilinear", scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, auto_augment: str = "",
                       color_jitter: float = 0.0, retries: int = RETRIES, read_timeout_s: float = READ_TIMEOUT_S,
                       pin_memory: bool = False) -> TrainLoader:
    """Training batches of RandomResizedCrop(img_size) + flip + normalise for one rank, from ``start_batch`` on;
    ``shuffle_buffer`` is in samples per worker (that many encoded images, ~110 KB each for ImageNet)."""
    check_common(batch_size, img_size, rank, world_size, workers, interpolation)
    shard_urls = expand_urls(urls)
    info = read_info(shard_urls)
    lengths, short = checked_lengths(shard_urls)
    plan = TrainPlan(tuple(shard_urls), tuple(lengths), batch_size, img_size, seed, epoch, rank, world_size,
                     max(1, workers), start_batch, max(1, shuffle_buffer), num_classes_of(info, num_classes),
                     tuple(mean), tuple(std), interpolation, tuple(scale), tuple(ratio), hflip, auto_augment,
                     color_jitter, retries, read_timeout_s, short=tuple(short.items()))
    if plan.batches == 0:
        raise ValueError(f"{plan.samples} training samples in {urls!r} fill no batch of {batch_size} "
                         f"on each of {world_size} process(es); lower the batch size")
    _check_start(start_batch, plan.batches)
    if len(shard_urls) < world_size * plan.slots:
        logger.info("%d training shards for %d reader slots (processes x workers): slots share shards, "
                    "each reading its own part", len(shard_urls), world_size * plan.slots)
    return TrainLoader(plan, workers, pin_memory)
