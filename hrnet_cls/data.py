"""Input pipelines over webdataset shards (SPEC sections 5 and 6).

Training (``build_train_loader``) is a pure function of (shards, seed, epoch, rank, world
size, workers): every rank yields the same number of batches, batch ``k`` is the same
tensors whether the epoch ran through or was resumed with ``start_batch=k``.

- The shards, in an order permuted per (seed, epoch), are laid end to end as one sequence
  of samples. Each (rank, worker) *slot* reads its own contiguous stretch of that sequence,
  sized to its exact quota of batches, so slots never overlap and a shard may be shared
  by slots (fewer shards than slots is fine). Quota per rank = total // (batch x world).
- A slot shuffles its samples through a buffer seeded by (seed, epoch, rank, slot), cuts
  batches, and decodes them with per-sample randomness seeded by (seed, epoch, key).
- Rank batch ``b`` comes from slot ``b % workers``; DataLoader worker ``w`` plays slot
  ``(w + start_batch) % workers`` so its round robin starts at batch ``start_batch``, and
  skipped batches are cut from raw bytes without decoding.
- Bad data: a sample with no image, a missing or bad label, a truncated tar or a missing
  shard is skipped before the shuffle (the slot reads on into the next stretch to fill its
  quota); an image that fails to decode is replaced by another sample of its batch with a
  fresh crop, so batches always hold ``batch_size`` images. Both are counted.

Evaluation (``build_val_loader``) splits the sequence of samples, in the given shard
order, into contiguous stretches across all (rank, worker) slots: every readable sample is
seen exactly once; ranks may yield different numbers of batches.

Batches are ``(images, targets, skipped)``: float32 (B, 3, S, S) normalised, int64 (B,), and
the number of bad samples this worker skipped since its previous batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import re
import sys
import tarfile
import time
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import braceexpand
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from hrnet_cls.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    INTERPOLATIONS,
    Normalizer,
    eval_crop,
    sample_rng,
    train_crop,
)

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "TrainLoader", "ValLoader", "accuracy_counts",
    "all_reduce_counts", "build_train_loader", "build_val_loader", "expand_urls", "read_info",
    "shard_lengths",
]

INFO_NAME = "_info.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # sample extensions tried, in this order
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, http://, s3://, ...
RawSample = tuple[str, bytes, int]  # (key, encoded image, class index)
T = TypeVar("T")


# ---------------------------------------------------------------- warnings


class _RateLimitedWarning:
    """Log the first ``burst`` warnings, then at most one per ``interval_s`` seconds, saying
    how many were held back (bad data in a large dataset must not flood the log)."""

    def __init__(self, burst: int = 10, interval_s: float = 30.0) -> None:
        self.burst, self.interval_s = burst, interval_s
        self.count, self.held, self.last = 0, 0, 0.0

    def __call__(self, msg: str, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count > self.burst and now - self.last < self.interval_s:
            self.held += 1
            return
        if self.held:
            msg += f" ({self.held} similar warnings held back)"
            self.held = 0
        self.last = now
        logger.warning(msg, *args)


_warn = _RateLimitedWarning()


# ---------------------------------------------------------------- shard lists


def _is_remote(url: str) -> bool:
    return bool(_SCHEME.match(url)) and not url.startswith("file:")


def _expand_pattern(pattern: str) -> list[str]:
    names = list(braceexpand.braceexpand(pattern))
    if _is_remote(pattern):
        return names  # pipe: commands and URLs are opened by webdataset's gopen
    paths: list[str] = []
    for name in names:
        name = os.path.expanduser(re.sub(r"^file:(//)?", "", name))
        paths += sorted(glob.glob(name)) if glob.has_magic(name) else [name]
    found = [p for p in paths if os.path.isfile(p)]
    if not found:
        hint = " (a directory; name its shards, e.g. DIR/train-*.tar)" if os.path.isdir(pattern) else ""
        raise FileNotFoundError(f"no shard file matches {pattern!r}{hint}")
    if len(found) < len(paths):
        missing = sorted(set(paths) - set(found))
        logger.warning("%d of the %d shards named by %r are missing (e.g. %s); their samples will be "
                       "skipped", len(missing), len(paths), pattern, missing[0])
    return paths


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard list from brace patterns (``train-{000000..000007}.tar``), globs, plain paths,
    ``pipe:`` commands and URLs; a string may join several with ``::``.

    Raises FileNotFoundError naming a local pattern that matches no file. Paths named by a
    pattern that matches some files but not all are kept (and skipped when read).
    """
    patterns = urls.split("::") if isinstance(urls, str) else [os.fspath(u) for u in urls]
    expanded = [url for pattern in patterns if pattern.strip() for url in _expand_pattern(pattern.strip())]
    if not expanded:
        raise FileNotFoundError(f"no shards given: {urls!r}")
    return expanded


def _info_location(urls_or_dir: str | Sequence[str]) -> str | None:
    """Where the _info.json for these shards would be: beside the first one."""
    if isinstance(urls_or_dir, (str, os.PathLike)) and os.path.isdir(urls_or_dir):
        return os.path.join(urls_or_dir, INFO_NAME)
    if isinstance(urls_or_dir, str):
        first = expand_urls(urls_or_dir)[0]
    else:  # already a list: its first entry's folder is enough (no globbing again)
        first = next(iter(braceexpand.braceexpand(os.fspath(urls_or_dir[0]))))
    if first.startswith("pipe:"):
        return None
    if _is_remote(first):
        return first.rsplit("/", 1)[0] + "/" + INFO_NAME
    return os.path.join(os.path.dirname(first), INFO_NAME)


def _load_info(where: str | None) -> dict | None:
    if where is None or not (_is_remote(where) or os.path.isfile(where)):
        return None
    try:
        with gopen(where) as f:
            info = json.load(f)
    except Exception as exc:  # noqa: BLE001 - an unreadable index only costs a recount
        logger.warning("cannot read %s (%r); counting samples in the shards instead", where, exc)
        return None
    if not isinstance(info, dict):
        logger.warning("%s is not a JSON object; ignored", where)
        return None
    return info


def read_info(urls_or_dir: str | Sequence[str]) -> dict | None:
    """The _info.json beside the shards (or in the directory given), None if there is none."""
    return _load_info(_info_location(urls_or_dir))


def _norm(url: str) -> str:
    return url if _is_remote(url) else os.path.normpath(os.path.abspath(url))


def _known_lengths(info: dict | None, where: str | None) -> dict[str, int]:
    """{normalised shard url: sample count} for every split listed in an _info.json."""
    if not info or where is None:
        return {}
    base = where.rsplit("/", 1)[0]  # the index lists shards relative to its own folder
    known = {}
    for split in info.get("splits", {}).values():
        for name, count in zip(split.get("filenames", ()), split.get("shard_lengths", ())):
            known[_norm(f"{base}/{name}")] = int(count)
    return known


def _open_tar(url: str) -> tarfile.TarFile:
    if _is_remote(url):
        return tarfile.open(fileobj=gopen(url), mode="r|*")
    return tarfile.open(url, mode="r:*")  # seekable: iterating members skips file data


def count_samples(url: str) -> int:
    """Samples (distinct consecutive keys) in one shard; what is readable if it is damaged."""
    count, last = 0, None
    try:
        with contextlib.closing(_open_tar(url)) as tar:
            for member in tar:
                key = base_plus_ext(member.name)[0] if member.isreg() else None
                if key is not None and key != last:
                    count, last = count + 1, key
    except (OSError, tarfile.TarError, ValueError) as exc:
        _warn("%s: counted %d samples before %r", url, count, exc)
    return count


def shard_lengths(urls: Sequence[str]) -> list[int]:
    """Samples per shard of an expanded list: from the _info.json beside the first shard
    where it lists the shard, else counted by reading the tar headers."""
    where = _info_location(urls)
    known = _known_lengths(_load_info(where), where)
    lengths = [known.get(_norm(url)) for url in urls]
    unknown = [url for url, n in zip(urls, lengths) if n is None]
    if unknown:
        logger.info("counting the samples of %d shard(s) not listed in an _info.json", len(unknown))
    return [count_samples(url) if n is None else n for url, n in zip(urls, lengths)]


def _num_classes(info: dict | None, given: int | None) -> int | None:
    if given is not None or not info:
        return given
    if "num_classes" in info:
        return int(info["num_classes"])
    return len(info["class_names"]) if info.get("class_names") else None


# ---------------------------------------------------------------- reading samples


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, counted in tar order."""

    url: str
    start: int
    stop: int


@dataclass
class _Counter:
    """Bad samples skipped so far by this worker."""

    n: int = 0


def _handler(stage: str, url: str) -> Callable[[Exception], bool]:
    """Per-stage webdataset error handler: warn and carry on with what is readable."""
    def handle(exc: Exception) -> bool:
        _warn("%s: %s stage: %r; skipping what it could not read", url, stage, exc)
        return True
    return handle


def _check_sample(sample: dict, num_classes: int | None) -> RawSample | str:
    """(key, image bytes, class index), or why the sample is unusable."""
    key = sample.get("__key__", "?")
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        return f"{key}: no .jpg/.png/.webp image"
    if "cls" not in sample:
        return f"{key}: no .cls label"
    try:
        target = int(sample["cls"])
    except ValueError:
        return f"{key}: label {bytes(sample['cls'][:20])!r} is not an integer"
    if target < 0 or (num_classes is not None and target >= num_classes):
        return f"{key}: label {target} outside 0..{(num_classes or 0) - 1}"
    return key, image, target


def read_segment(seg: Segment, num_classes: int | None, skipped: _Counter) -> Iterator[RawSample]:
    """Usable samples of ``seg``; unusable, unreadable or missing ones are added to ``skipped``."""
    try:
        stream = gopen(seg.url)
    except Exception as exc:  # noqa: BLE001 - a missing or unreachable shard is skipped, not fatal
        _warn("%s: cannot open (%r); skipping its %d samples", seg.url, exc, seg.stop - seg.start)
        skipped.n += seg.stop - seg.start
        return
    seen = 0
    try:
        files = tar_file_expander([{"url": seg.url, "stream": stream}], handler=_handler("tar", seg.url))
        for index, sample in enumerate(group_by_keys(files, handler=_handler("group", seg.url))):
            if index >= seg.stop:
                break
            if index < seg.start:
                continue
            seen += 1
            raw = _check_sample(sample, num_classes)
            if isinstance(raw, str):
                _warn("%s: %s; skipped", seg.url, raw)
                skipped.n += 1
                continue
            yield raw
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    if seen < seg.stop - seg.start:
        _warn("%s: %d of its samples missing (truncated tar?); skipped", seg.url, seg.stop - seg.start - seen)
        skipped.n += seg.stop - seg.start - seen


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def shuffle_buffer(items: Iterable[T], size: int, rng) -> Iterator[T]:
    """Shuffle a stream through a buffer of ``size`` items (deterministic given ``rng``)."""
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


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


def _slot_stream(plan: TrainPlan, slot: int, skipped: _Counter) -> Iterator[RawSample]:
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
            _warn("sample %s: image does not decode (%r); replaced by another of its batch", key, exc)
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
    skipped = _Counter()
    rng = sample_rng(plan.seed, plan.epoch, plan.rank, slot, "buffer")
    stream = shuffle_buffer(_slot_stream(plan, slot, skipped), plan.buffer, rng)
    normalize = Normalizer(plan.mean, plan.std)
    first = max(0, -(-(plan.start_batch - slot) // plan.slots))  # local batches before start_batch
    reported = 0
    for local, chunk in enumerate(_chunks(stream, plan.batch_size)):
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

    @property
    def num_samples(self) -> int:
        """Samples in the training shards (per _info.json or counted)."""
        return sum(self.plan.lengths)

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

    ``num_classes`` (default: from _info.json) bounds valid labels; ``shuffle_buffer`` is
    in samples per worker (memory: that many encoded images).
    """
    _check_common(batch_size, img_size, rank, world_size, workers, interpolation)
    shard_urls = expand_urls(urls)
    info = read_info(shard_urls)
    plan = TrainPlan(tuple(shard_urls), tuple(shard_lengths(shard_urls)), batch_size, img_size, seed,
                     epoch, rank, world_size, max(1, workers), start_batch, max(1, shuffle_buffer),
                     _num_classes(info, num_classes), tuple(mean), tuple(std), interpolation,
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
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    batch_size: int
    img_size: int
    resize: int  # shorter side before the centre crop, pixels
    rank: int
    world_size: int
    slots: int
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
    skipped, normalize = _Counter(), Normalizer(plan.mean, plan.std)
    held: tuple[torch.Tensor, torch.Tensor] | None = None
    images = torch.empty(plan.batch_size, 3, plan.img_size, plan.img_size)
    targets: list[int] = []
    for seg in plan.segments(slot):
        for key, data, target in read_segment(seg, plan.num_classes, skipped):
            try:
                pixels = eval_crop(data, plan.img_size, plan.resize, interpolation=plan.interpolation)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
                _warn("sample %s: image does not decode (%r); skipped", key, exc)
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

    @property
    def num_samples(self) -> int:
        """Samples this rank reads."""
        return sum(hi - lo for lo, hi in map(self.plan.slot_range, range(self.plan.slots)))

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
                   _num_classes(info, num_classes), tuple(mean), tuple(std), interpolation)
    return ValLoader(plan, workers, pin_memory)


# ---------------------------------------------------------------- metrics


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> torch.Tensor:
    """int64 [correct in top-k for each k, number of samples], on the logits' device.

    logits: (N, C); targets: (N,). k above C counts as C (every sample is then correct).
    Counts, unlike averages, add up exactly over batches and processes.
    """
    maxk = min(max(topk), logits.shape[1])
    hits = logits.topk(maxk, dim=1).indices.eq(targets.view(-1, 1))  # (N, maxk)
    counts = [hits[:, :min(k, maxk)].any(dim=1).sum() for k in topk]
    counts.append(torch.tensor(targets.shape[0], device=logits.device))
    return torch.stack(counts).to(torch.int64)


def all_reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum of ``counts`` over all processes when torch.distributed is initialised (a copy)."""
    total = counts.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
