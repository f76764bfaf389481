"""Reading webdataset shards: shard lists, the _info.json index, and the checked samples of one
stretch of a shard, every webdataset stage under its own error handler (docs/design.md §4.7, §5.2).
Unusable samples are skipped and counted; a label out of range raises LabelError instead."""
from __future__ import annotations

import collections
import contextlib
import glob
import json
import logging
import os
import random
import re
import tarfile
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as wds_expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from hrnet_cls.data.remote import BACKOFF_S, READ_TIMEOUT_S, RETRIES, NetworkError, has_command, open_remote

logger = logging.getLogger(__name__)

INFO_NAME = "_info.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # sample extensions tried, in this order
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, http://, s3://, ...
RawSample = tuple[str, bytes, int, int]  # (key, encoded image, class index, position in the sequence read)
T = TypeVar("T")


class _RateLimitedWarning:
    """Log the first ``burst`` warnings, then at most one per ``interval_s`` seconds, counting those held back."""

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


warn = _RateLimitedWarning()


def _is_remote(url: str) -> bool:
    return bool(_SCHEME.match(url)) and not url.startswith("file:")


def _expand_pattern(pattern: str) -> list[str]:
    names = wds_expand_urls(pattern)  # braces and WDS_ environment variables, as webdataset reads them
    if _is_remote(pattern):
        return names
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
    """Shard list from brace patterns, globs, plain paths, ``pipe:`` commands and URLs (``::`` joins several).
    FileNotFoundError for a pattern matching no file; missing paths of a partly matched one are kept."""
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
    else:  # already expanded: no globbing again
        first = wds_expand_urls(os.fspath(urls_or_dir[0]))[0]
    if first.startswith("pipe:"):  # the same command for the index: the shard's file name replaced
        name = re.search(r"[^\s/'\"]+\.tar\b", first)
        return None if name is None else first[:name.start()] + INFO_NAME + first[name.end():]
    if _is_remote(first):
        return first.rsplit("/", 1)[0] + "/" + INFO_NAME
    return os.path.join(os.path.dirname(first), INFO_NAME)


def load_info_file(where: str) -> dict | None:
    """The _info.json object at a path or URL, or None; ValueError naming it if unreadable or not an object."""
    if not (_is_remote(where) or os.path.isfile(where)):
        return None
    try:
        with open_remote(where) if has_command(where) else gopen(where) as f:
            info = json.load(f)
    except Exception as exc:  # noqa: BLE001 - JSON, OS and transport errors all mean "unreadable"
        raise ValueError(f"{where}: unreadable ({exc})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{where}: not a JSON object")
    return info


def _load_info(where: str | None) -> dict | None:
    try:
        return None if where is None else load_info_file(where)
    except ValueError as exc:  # an unreadable index only costs a recount
        logger.warning("%s; counting samples in the shards instead", exc)
        return None


def read_info(urls_or_dir: str | Sequence[str]) -> dict | None:
    """The _info.json beside the shards (or in the directory given), None if there is none."""
    return _load_info(_info_location(urls_or_dir))


def _norm(url: str) -> str:
    return url if _is_remote(url) else os.path.normpath(os.path.abspath(url))


def _known_lengths(info: dict | None, where: str | None) -> dict[str, int]:
    """{normalised shard url: sample count} for every split listed in an _info.json."""
    if not info or where is None:
        return {}
    remote = _is_remote(where)
    base = where.rsplit("/", 1)[0] if remote else os.path.dirname(where)
    known = {}
    for split in info.get("splits", {}).values():
        for name, count in zip(split.get("filenames", ()), split.get("shard_lengths", ())):
            known[_norm(f"{base}/{name}" if remote else os.path.join(base, name))] = int(count)
    return known


def _open_tar(url: str) -> tarfile.TarFile:
    if _is_remote(url):
        return tarfile.open(fileobj=open_remote(url) if has_command(url) else gopen(url), mode="r|*")
    return tarfile.open(url, mode="r:*")  # seekable: iterating members skips file data


def count_samples(url: str, retries: int = RETRIES) -> int:
    """Samples (distinct consecutive keys) in one shard; of a damaged one, those wholly inside its readable part.
    A remote read that fails is retried, and after ``retries`` raises NetworkError: never a shorter count."""
    attempt = 0
    while True:
        try:
            return _count(url)
        except NetworkError as exc:
            if attempt == retries:
                raise NetworkError(f"{exc} (counting its samples; {retries} retries failed)") from None
            logger.warning("%s; counting again, retry %d of %d", exc, attempt + 1, retries)
            time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1


def _count(url: str) -> int:
    count, last = 0, None
    try:
        size = None if _is_remote(url) else os.path.getsize(url)
        with contextlib.closing(_open_tar(url)) as tar:
            for member in tar:
                if size is not None and member.offset_data + member.size > size:
                    break
                key = base_plus_ext(member.name)[0] if member.isreg() else None
                if key is not None and key != last:
                    count, last = count + 1, key
    except (OSError, tarfile.TarError, ValueError) as exc:
        if isinstance(exc.__context__, NetworkError):  # tarfile wraps the stream's error
            raise exc.__context__ from None
        warn("%s: counted %d samples before %r", url, count, exc)
    return count


def shard_lengths(urls: Sequence[str]) -> list[int]:
    """Samples per shard: from the _info.json beside the first shard where it lists it, else from tar headers."""
    where = _info_location(urls)
    known = _known_lengths(_load_info(where), where)
    listed = [known.get(_norm(url)) for url in urls]
    if None in listed:
        logger.info("counting the samples of %d shard(s) not listed in an _info.json", listed.count(None))
    return [count_samples(url) if n is None else n for url, n in zip(urls, listed)]


def _looks_whole(path: str) -> bool:
    """Whether a local file ends in a tar's zero blocks (a file cut on copy does not); one small read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 1024))
            return size >= 1024 and size % 512 == 0 and not any(f.read())
    except OSError:
        return False


def checked_lengths(urls: Sequence[str]) -> tuple[list[int], dict[str, int]]:
    """(samples per shard, {shard: listed samples not there}): shard_lengths, with a local shard that does
    not end like a whole tar recounted and logged, so training never plans on samples that are not there."""
    lengths, short = [], {}
    for url, n in zip(urls, shard_lengths(urls)):
        if _is_remote(url) or _looks_whole(url):
            lengths.append(n)
            continue
        real = count_samples(url) if os.path.exists(url) else 0
        if real < n:
            logger.warning("%s: holds %d samples, %d fewer than the _info.json lists (cut short, damaged or "
                           "missing); the epoch leaves them out", url, real, n - real)
            short[url] = n - real
        lengths.append(min(n, real))
    return lengths, short


def info_num_classes(urls: Sequence[str]) -> int | None:
    """The class count the _info.json beside these shards states, or None (no index, or no count)."""
    return num_classes_of(read_info(list(urls)), None)


def num_classes_of(info: dict | None, given: int | None) -> int | None:
    if given is not None or not info:
        return given
    if "num_classes" in info:
        return int(info["num_classes"])
    return len(info["class_names"]) if info.get("class_names") else None


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard in tar order; its sample i is position ``base + i`` of the sequence read."""

    url: str
    start: int
    stop: int
    base: int = 0


class LabelError(ValueError):
    """A label outside 0..num_classes-1: the data and model.num_classes disagree (never skipped)."""

    @property
    def reason(self) -> str:
        """The message as raised, also after torch re-raised it from a DataLoader worker with the
        worker's traceback in front (the text after its last 'LabelError: ')."""
        return str(self).strip().splitlines()[-1].split("LabelError: ")[-1]


@dataclass
class SkipCounter:
    """Bad samples skipped so far by this worker, in all and per shard."""

    n: int = 0
    shards: collections.Counter = field(default_factory=collections.Counter)

    def add(self, url: str, n: int = 1) -> None:
        self.n += n
        self.shards[url] += n

    def take(self) -> tuple[int, dict[str, int]]:
        """(count, per shard) since the last take."""
        taken = self.n, dict(self.shards)
        self.n, self.shards = 0, collections.Counter()
        return taken


def _handler(stage: str, url: str) -> Callable[[Exception], bool]:
    """Per-stage webdataset error handler: warn and carry on with what is readable."""
    def handle(exc: Exception) -> bool:
        network = exc if isinstance(exc, NetworkError) else exc.__context__
        if isinstance(network, NetworkError):  # a transport fault: retried by read_segment, never bad data
            raise NetworkError(network.message) from None
        warn("%s: %s stage: %r; skipping what it could not read", url, stage, exc)
        return True
    return handle


def _check_sample(sample: dict, num_classes: int | None, url: str) -> tuple[str, bytes, int] | str:
    """(key, image bytes, class index), or why the sample is unusable; a label out of range raises LabelError."""
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
        span = f"0..{num_classes - 1} (num_classes={num_classes})" if num_classes is not None else "0.."
        raise LabelError(f"{url}: sample {key}: label {target} outside {span}; the data and the model's "
                         "number of classes disagree")
    return key, image, target


def read_segment(seg: Segment, num_classes: int | None, skipped: SkipCounter, retries: int = RETRIES,
                 read_timeout_s: float = READ_TIMEOUT_S) -> Iterator[RawSample]:
    """Usable samples of ``seg``; unusable, unreadable or missing ones are added to ``skipped``. A remote read
    that is cut or stalls is opened again and continues at the sample where it broke (each sample is still
    read once), ``retries`` times; then NetworkError names the shard: a network failure, never bad data."""
    done = [seg.start]  # the next sample wanted, kept across attempts
    for attempt in range(retries + 1):
        try:
            yield from _read_from(seg, done, num_classes, skipped, read_timeout_s)
            return
        except NetworkError as exc:
            if attempt == retries:
                raise NetworkError(f"{exc}; {retries} retries failed at sample {done[0]} of its {seg.start}.."
                                   f"{seg.stop}") from None
            logger.warning("%s; retry %d of %d from sample %d", exc, attempt + 1, retries, done[0])
            time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])


def _read_from(seg: Segment, done: list[int], num_classes: int | None, skipped: SkipCounter,
               read_timeout_s: float) -> Iterator[RawSample]:
    """read_segment's samples from index ``done[0]`` on, in one read of the shard, advancing ``done[0]``."""
    remote = has_command(seg.url)
    try:
        stream = open_remote(seg.url, read_timeout_s) if remote else gopen(seg.url)
    except Exception as exc:  # noqa: BLE001 - a missing or unreachable local shard is skipped, not fatal
        warn("%s: cannot open (%r); skipping its %d samples", seg.url, exc, seg.stop - done[0])
        skipped.add(seg.url, seg.stop - done[0])
        return
    seen = done[0] - seg.start
    try:
        files = tar_file_expander([{"url": seg.url, "stream": stream}], handler=_handler("tar", seg.url))
        for index, sample in enumerate(group_by_keys(files, handler=_handler("group", seg.url))):
            if index >= seg.stop:
                break
            if index < done[0]:
                continue
            seen, done[0] = seen + 1, index + 1
            checked = _check_sample(sample, num_classes, seg.url)
            if isinstance(checked, str):
                warn("%s: %s; skipped", seg.url, checked)
                skipped.add(seg.url)
                continue
            yield (*checked, seg.base + index)
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    if seen < seg.stop - seg.start:
        warn("%s: %d of its samples missing (truncated tar?); skipped", seg.url, seg.stop - seg.start - seen)
        skipped.add(seg.url, seg.stop - seg.start - seen)


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
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
