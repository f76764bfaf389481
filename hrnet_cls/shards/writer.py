"""Writing shards: items cut into shards, each written under a temporary name and published (hrnet_cls.atomic)
when complete, the split recorded in _info.json at the end (shards/README.md, docs/design.md §5.2)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from hrnet_cls.atomic import publish, write_atomic
from hrnet_cls.data.sources import INFO_NAME, load_info_file
from hrnet_cls.data.transforms import WIDE_GRAY_MODES, wide_gray_to_uint8
from hrnet_cls.shards.scan import Item, ScanReport, SourceError, collect_items

logger = logging.getLogger("hrnet_cls.shards")

FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> extension (MPO: a JPEG)
TAR_BLOCK = 512  # bytes; tar stores every header and data run in whole blocks
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a closed archive to whole records


@dataclass
class WriteResult:
    split: str
    filenames: list[str]  # relative to OUT_DIR, in shard order
    shard_lengths: list[int]
    bad: list[tuple[str, str]]  # (source path, reason) of files left out: unreadable or not decoding
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, path kept): same real file

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)


def _member_size(name: str, nbytes: int) -> int:
    """Bytes one tar member takes: header, GNU long-name record if needed, padded data."""
    def blocks(n: int) -> int:
        return -(-n // TAR_BLOCK) * TAR_BLOCK

    long_name = TAR_BLOCK + blocks(len(name) + 1) if len(name) >= 100 else 0
    return TAR_BLOCK + long_name + blocks(nbytes)


def _sample_size(item: Item, with_json: bool) -> int:
    # The .cls and .json members are a few dozen bytes: one data block each.
    size = _member_size(f"{item.key}.jpeg", item.nbytes) + _member_size(f"{item.key}.cls", 1)
    return size + (_member_size(f"{item.key}.json", 1) if with_json else 0)


def plan_shards(items: Sequence[Item], max_per_shard: int, max_shard_bytes: int,
                with_json: bool = True) -> list[list[Item]]:
    """Cut the (shuffled) items into shards of <= max_per_shard samples and <= max_shard_bytes (or one sample)."""
    groups: list[list[Item]] = []
    current: list[Item] = []
    size = 2 * TAR_BLOCK  # end-of-archive marker
    for item in items:
        grown = size + _sample_size(item, with_json)
        padded = -(-grown // TAR_RECORD) * TAR_RECORD
        if current and (len(current) >= max_per_shard or padded > max_shard_bytes):
            groups.append(current)
            current, grown = [], 2 * TAR_BLOCK + _sample_size(item, with_json)
        current.append(item)
        size = grown
    if current:
        groups.append(current)
    return groups


def shard_image(data: bytes) -> tuple[str, bytes]:
    """(sample extension, bytes to store) for encoded image bytes, raising if they do not fully decode: the
    source's bytes, but wide grayscale as an 8-bit PNG, value >> 8 (shards/README.md, 16-bit images)."""
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        img.load()
        if fmt not in FORMAT_EXT:
            raise ValueError(f"unsupported image format {fmt} (JPEG, PNG or WebP expected)")
        if img.mode not in WIDE_GRAY_MODES:
            return FORMAT_EXT[fmt], data
        buf = io.BytesIO()
        Image.fromarray(wide_gray_to_uint8(img)).save(buf, "PNG")  # uint8 (H, W): mode L
    return "png", buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed, so a rerun with the same seed writes byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def _write_group(task: tuple[list[Item], str, bool]) -> tuple[int, list[tuple[str, str]]]:
    """Write one shard to a temporary path; (samples written, [(path, reason)] left out)."""
    items, tmp_path, with_json = task
    written, bad = 0, []
    with tarfile.open(tmp_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for item in items:
            try:
                with open(item.path, "rb") as f:
                    data = f.read()
                ext, data = shard_image(data)
            except UnidentifiedImageError:
                bad.append((item.path, "not an image format PIL recognises"))
                continue
            except Exception as exc:  # noqa: BLE001 - any decode failure means "not an image"
                bad.append((item.path, f"{type(exc).__name__}: {exc}"))
                continue
            _add_member(tar, f"{item.key}.{ext}", data)
            _add_member(tar, f"{item.key}.cls", str(item.label).encode())
            if with_json:
                meta = {"filename": item.rel, "class": item.class_name}
                _add_member(tar, f"{item.key}.json", json.dumps(meta).encode())
            written += 1
    return written, bad


@contextlib.contextmanager
def _ordered_map(workers: int) -> Iterator[Callable]:
    """An ordered, lazy map running in ``workers`` processes (in-process for 1)."""
    if workers <= 1:
        yield map
        return
    import multiprocessing

    with multiprocessing.Pool(workers) as pool:
        yield lambda fn, tasks: pool.imap(fn, tasks, chunksize=1)


def write_groups(groups: list[list[Item]], out_dir: Path, split: str, workers: int,
                 progress: bool, with_json: bool = True) -> WriteResult:
    """Write shards in parallel, each published under its final, contiguous name once complete (empty ones dropped)."""
    tasks = [(group, str(out_dir / f".{split}-{i:06d}.tar.partial"), with_json)
             for i, group in enumerate(groups)]
    result = WriteResult(split, [], [], [])
    log_every = max(1, len(tasks) // 10)  # progress lines when there is no terminal for a bar
    with _ordered_map(workers) as imap:
        bar = tqdm(total=sum(map(len, groups)), desc=f"{split} shards", unit="img", mininterval=1.0,
                   disable=not (progress and sys.stderr.isatty()))
        for done, ((group, tmp, _), (count, bad)) in enumerate(zip(tasks, imap(_write_group, tasks)), 1):
            for path, reason in bad:
                logger.warning("skipped %s: %s", path, reason)
            result.bad += bad
            bar.update(len(group))
            if count == 0:
                os.remove(tmp)
            else:
                final = f"{split}-{len(result.filenames):06d}.tar"
                publish(tmp, out_dir / final)
                result.filenames.append(final)
                result.shard_lengths.append(count)
            if progress and bar.disable and (done % log_every == 0 or done == len(tasks)):
                logger.info("%s: %d/%d shards written", split, done, len(tasks))
        bar.close()
    return result


def load_info(path: Path) -> dict:
    """The _info.json at ``path`` ({} when absent); an unreadable one stops the write."""
    try:
        return load_info_file(str(path)) or {}
    except ValueError as exc:
        raise SourceError(f"{exc}; fix or delete it") from None


def _forget_split(info_path: Path, split: str) -> None:
    info = load_info(info_path)
    if split in info.get("splits", {}):
        del info["splits"][split]
        write_atomic(info_path, json.dumps(info, indent=1) + "\n")


def _remove_leftovers(out_dir: Path, split: str, keep: int | None) -> None:
    """Delete partial shards of ``split``; with ``keep``, also its shards numbered >= keep."""
    for path in out_dir.glob(f".{split}-*.tar.partial"):
        path.unlink()
    if keep is not None:
        pattern = re.compile(rf"{re.escape(split)}-(\d{{6}})\.tar")
        for path in out_dir.glob(f"{split}-*.tar"):
            match = pattern.fullmatch(path.name)
            if match and int(match.group(1)) >= keep:
                path.unlink()


def write_split(src: str | Path, out_dir: str | Path, split: str, *, labels: str | Path | None = None,
                seed: int = 0, max_per_shard: int = 1000, max_shard_bytes: int = 1 << 30,
                workers: int = 1, name: str | None = None, with_json: bool = True,
                progress: bool = True) -> WriteResult:
    """Write SRC as ``OUT_DIR/{split}-NNNNNN.tar`` shards and record them in _info.json."""
    src, out_dir = Path(src), Path(out_dir)
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise SourceError(f"split name {split!r}: use letters, digits and '_' only")
    if max_per_shard < 1 or max_shard_bytes < 1:
        raise SourceError("--max-per-shard and --max-shard-bytes must be positive")
    if not src.is_dir():
        raise SourceError(f"{src}: {'not a directory' if src.exists() else 'no such directory'}")
    info_path = out_dir / INFO_NAME
    report = ScanReport()
    items, class_names = collect_items(src, Path(labels) if labels else None,
                                      load_info(info_path).get("class_names"), info_path, report)
    random.Random(seed).shuffle(items)
    groups = plan_shards(items, max_per_shard, max_shard_bytes, with_json)

    out_dir.mkdir(parents=True, exist_ok=True)
    _forget_split(info_path, split)
    _remove_leftovers(out_dir, split, keep=None)
    result = write_groups(groups, out_dir, split, workers, progress, with_json)
    result.bad[:0] = report.skipped  # left out by the scan (dangling symlinks), already logged
    result.duplicates = report.duplicates
    _remove_leftovers(out_dir, split, keep=len(result.filenames))
    if not result.filenames:
        raise SourceError(f"{src}: none of its {len(items)} images decoded")

    info = load_info(info_path)  # re-read: keeps splits written meanwhile
    info["name"] = name or info.get("name") or out_dir.resolve().name
    info["num_classes"] = len(class_names)
    info["class_names"] = class_names
    info.setdefault("splits", {})[split] = {
        "name": split, "num_samples": result.num_samples,
        "filenames": result.filenames, "shard_lengths": result.shard_lengths}
    write_atomic(info_path, json.dumps(info, indent=1) + "\n")
    return result
