"""Write image datasets as webdataset tar shards (SPEC section 6).

    python -m hrnet_cls.shards write /data/imagenet/train /data/imagenet-wds --split train
    python -m hrnet_cls.shards write /data/imagenet/val /data/imagenet-wds --split val \\
        --labels /data/imagenet/val_labels.txt

A sample is ``KEY.jpg`` (or ``.png``/``.webp``: the source file's bytes, never re-encoded),
``KEY.cls`` (decimal class index) and ``KEY.json`` (source path and class name). Shards are
``OUT_DIR/{split}-000000.tar``, ...; ``OUT_DIR/_info.json`` indexes them in the layout timm's
``wds/`` reader reads and holds the class list every split of OUT_DIR shares.

Sources: an ImageFolder tree (one sub-folder per class; the first split written fixes the
class order as sorted folder names, like torchvision) or a flat folder plus ``--labels``
(lines ``FILENAME CLASS`` or ``FILENAME,CLASS``; CLASS is a class name or an index).

Every file is decoded once (the CPU-heavy part, spread over ``--workers`` processes); one that
does not decode is reported by path and left out. Shards are written under temporary names
and renamed when complete, and the split's entry in _info.json is removed first and written
back (atomically) only at the end, so an interrupted run never leaves a listed partial shard.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import os
import random
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

# Named explicitly so `python -m hrnet_cls.shards` does not log as "__main__".
logger = logging.getLogger("hrnet_cls.shards")

INFO_NAME = "_info.json"
SOURCE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# PIL format -> sample extension. MPO is the multi-picture JPEG some cameras write.
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
TAR_BLOCK = 512  # bytes; tar stores every header and data run in whole blocks
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a closed archive to whole records
_HEADER_WORDS = ({"filename", "file", "image", "path", "name"}, {"class", "label", "target"})
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # webdataset splits keys at the first dot


class SourceError(ValueError):
    """A problem with SRC, the labels file or OUT_DIR that the user must fix (one line)."""


@dataclass(frozen=True)
class Item:
    """One source image planned into a shard."""

    path: str  # absolute source path
    rel: str  # path relative to SRC, kept in the json sidecar
    label: int  # class index
    class_name: str
    key: str  # webdataset sample key: unique within the split, no dots
    nbytes: int  # file size, for --max-shard-bytes


@dataclass
class WriteResult:
    split: str
    filenames: list[str]  # relative to OUT_DIR, in shard order
    shard_lengths: list[int]
    bad: list[tuple[str, str]]  # (source path, reason) of files left out

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)


# ---------------------------------------------------------------- sources and labels


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in SOURCE_SUFFIXES


def _images_under(folder: Path, src: Path) -> list[str]:
    """Image paths under ``folder`` (recursive, sorted), relative to ``src``."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.relpath(os.path.join(root, f), src) for f in files if _is_image_name(f)]
    return sorted(found)


def scan_image_folder(src: Path) -> dict[str, list[str]]:
    """{class folder name: image paths relative to SRC} for an ImageFolder tree."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = any(_is_image_name(p.name) for p in src.iterdir() if p.is_file())
        hint = "; pass --labels FILE for a flat folder" if loose else ""
        raise SourceError(f"{src}: no class sub-folders with images{hint}")
    found = {name: _images_under(src / name, src) for name in classes}
    if not any(found.values()):
        raise SourceError(f"{src}: no .jpg/.jpeg/.png/.webp files in its class folders")
    empty = [name for name, files in found.items() if not files]
    if empty:
        logger.warning("%d class folder(s) hold no images, e.g. %s", len(empty), empty[0])
    return found


def _is_header(fields: list[str]) -> bool:
    return fields[0].lower() in _HEADER_WORDS[0] and fields[1].lower() in _HEADER_WORDS[1]


def read_labels(path: Path) -> list[tuple[str, str, int]]:
    """(filename, class token, line number) per line of a labels file.

    Lines are ``FILENAME CLASS`` or ``FILENAME,CLASS``; blank lines, ``#`` comments and a
    ``filename,class`` style header are ignored.
    """
    if not path.is_file():
        raise SourceError(f"{path}: labels file not found")
    rows: list[tuple[str, str, int]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.strip()
                if not text or text.startswith("#"):
                    continue
                fields = next(csv.reader([text])) if "," in text else text.split()
                fields = [x.strip() for x in fields]
                if len(fields) != 2 or not all(fields):
                    raise SourceError(
                        f"{path}:{lineno}: expected 'FILENAME CLASS' or 'FILENAME,CLASS', got {text!r}")
                if not rows and _is_header(fields):
                    continue
                rows.append((fields[0], fields[1], lineno))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    if not rows:
        raise SourceError(f"{path}: no labels in the file")
    return rows


def _stem_index(src: Path) -> dict[str, str | None]:
    """{file stem: file name} for SRC's top-level images; None where a stem is ambiguous."""
    index: dict[str, str | None] = {}
    for p in src.iterdir():
        if p.is_file() and _is_image_name(p.name):
            index[p.stem] = None if p.stem in index else p.name
    return index


def match_labelled_files(src: Path, labels: Path) -> list[tuple[str, str, int]]:
    """(path relative to SRC, class token, line number) for every labels-file line.

    A listed name may omit the extension (``ILSVRC2012_val_00000001``) when the stem is unique.
    """
    stems = _stem_index(src)
    rows, used = [], {}
    for name, token, lineno in read_labels(labels):
        stem = Path(name).stem if Path(name).suffix.lower() in SOURCE_SUFFIXES else name
        rel = name if (src / name).is_file() else stems.get(stem)
        if rel is None or not (src / rel).is_file():
            raise SourceError(f"{labels}:{lineno}: {name} not found in {src}")
        if rel in used:
            raise SourceError(f"{labels}:{lineno}: {name} already labelled on line {used[rel]}")
        used[rel] = lineno
        rows.append((rel, token, lineno))
    unlisted = sum(1 for stem, n in stems.items() if n is not None and n not in used)
    if unlisted:
        logger.warning("%d image(s) in %s have no line in %s and are left out", unlisted, src, labels)
    return rows


def _token_to_index(token: str, lookup: dict[str, int], where: str, info_path: Path) -> int:
    """A class name from the stored list, else a decimal index within it."""
    if token in lookup:
        return lookup[token]
    if token.isdigit() and int(token) < len(lookup):
        return int(token)
    raise SourceError(f"{where}: class {token!r} is neither in the class list of {info_path} "
                      f"nor an index below {len(lookup)}")


# ---------------------------------------------------------------- planning


def make_keys(rels: Sequence[str]) -> list[str]:
    """Unique sample keys: the file stem when stems are unique in the split, else the path.

    Characters other than letters, digits, '-' and '_' become '_' (webdataset cuts keys at
    the first dot and treats '/' as a folder).
    """
    stems = [_KEY_UNSAFE.sub("_", Path(r).stem) for r in rels]
    if len(set(stems)) == len(stems):
        return stems
    keys, used = [], set()
    for rel in rels:
        base = _KEY_UNSAFE.sub("_", str(Path(rel).with_suffix("")))
        key, n = base, 0
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        keys.append(key)
    return keys


def _make_items(src: Path, rels: list[str], labels: list[int], class_names: list[str]) -> list[Item]:
    keys = make_keys(rels)
    return [Item(str((src / rel).resolve()), rel, label, class_names[label], key,
                 os.path.getsize(src / rel)) for rel, label, key in zip(rels, labels, keys)]


def collect_items(src: Path, labels: Path | None, class_names: list[str] | None,
                  info_path: Path) -> tuple[list[Item], list[str]]:
    """Source images with class indices, and the class list OUT_DIR will store.

    ``class_names`` is the list already stored in OUT_DIR (None for a fresh OUT_DIR).
    """
    if labels is None:
        by_class = scan_image_folder(src)
        if class_names is None:
            class_names = list(by_class)
        lookup = {name: i for i, name in enumerate(class_names)}
        unknown = [name for name in by_class if name not in lookup]
        if unknown:
            raise SourceError(f"{src / unknown[0]}: class {unknown[0]!r} is not in the class list "
                              f"of {info_path} ({len(class_names)} classes)")
        rels = [rel for files in by_class.values() for rel in files]
        indices = [lookup[name] for name, files in by_class.items() for _ in files]
        return _make_items(src, rels, indices, class_names), class_names
    rows = match_labelled_files(src, labels)
    if class_names is None:
        if all(token.isdigit() for _, token, _ in rows):
            raise SourceError(f"{labels}: labels are class indices but {info_path} holds no class "
                              "list yet; write the ImageFolder split into OUT_DIR first")
        class_names = sorted({token for _, token, _ in rows})
    lookup = {name: i for i, name in enumerate(class_names)}
    indices = [_token_to_index(t, lookup, f"{labels}:{n}", info_path) for _, t, n in rows]
    return _make_items(src, [r for r, _, _ in rows], indices, class_names), class_names


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
    """Cut the (already shuffled) items into shards of at most max_per_shard samples and at
    most max_shard_bytes bytes on disk; a single larger sample gets a shard of its own."""
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


# ---------------------------------------------------------------- writing


def image_extension(data: bytes) -> str:
    """Sample extension for encoded image bytes; raises if they do not fully decode.

    ``load`` decodes every pixel: a truncated JPEG opens (header only) and fails here.
    """
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        img.load()
    if fmt not in FORMAT_EXT:
        raise ValueError(f"unsupported image format {fmt} (JPEG, PNG or WebP expected)")
    return FORMAT_EXT[fmt]


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
                ext = image_extension(data)
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


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, mininterval=1.0)


def write_groups(groups: list[list[Item]], out_dir: Path, split: str, workers: int,
                 progress: bool, with_json: bool = True) -> WriteResult:
    """Write shards in parallel; each is renamed to its final, contiguous name once complete
    (a shard whose every file failed to decode is dropped)."""
    tasks = [(group, str(out_dir / f".{split}-{i:06d}.tar.partial"), with_json)
             for i, group in enumerate(groups)]
    result = WriteResult(split, [], [], [])
    log_every = max(1, len(tasks) // 10)  # progress lines when there is no terminal for a bar
    with _ordered_map(workers) as imap:
        bar = _progress(sum(map(len, groups)), f"{split} shards", progress and sys.stderr.isatty())
        for done, ((group, tmp, _), (count, bad)) in enumerate(zip(tasks, imap(_write_group, tasks)), 1):
            for path, reason in bad:
                logger.warning("skipped %s: %s", path, reason)
            result.bad += bad
            bar.update(len(group))
            if count == 0:
                os.remove(tmp)
            else:
                final = f"{split}-{len(result.filenames):06d}.tar"
                os.replace(tmp, out_dir / final)
                result.filenames.append(final)
                result.shard_lengths.append(count)
            if progress and bar.disable and (done % log_every == 0 or done == len(tasks)):
                logger.info("%s: %d/%d shards written", split, done, len(tasks))
        bar.close()
    return result


# ---------------------------------------------------------------- _info.json


def load_info(path: Path) -> dict:
    """The _info.json at ``path`` ({} when absent)."""
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable ({exc}); fix or delete it") from None
    if not isinstance(info, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return info


def write_json_atomic(path: Path, obj: dict) -> None:
    """Readers see the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _forget_split(info_path: Path, split: str) -> None:
    info = load_info(info_path)
    if split in info.get("splits", {}):
        del info["splits"][split]
        write_json_atomic(info_path, info)


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
    items, class_names = collect_items(src, Path(labels) if labels else None,
                                      load_info(info_path).get("class_names"), info_path)
    random.Random(seed).shuffle(items)
    groups = plan_shards(items, max_per_shard, max_shard_bytes, with_json)

    out_dir.mkdir(parents=True, exist_ok=True)
    _forget_split(info_path, split)
    _remove_leftovers(out_dir, split, keep=None)
    result = write_groups(groups, out_dir, split, workers, progress, with_json)
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
    write_json_atomic(info_path, info)
    return result


# ---------------------------------------------------------------- CLI


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hrnet_cls.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write SRC as OUT_DIR/{split}-NNNNNN.tar + _info.json")
    write.add_argument("src", help="ImageFolder tree (one folder per class), or a flat folder with --labels")
    write.add_argument("out_dir", help="shard folder; created if missing, shared by all splits")
    write.add_argument("--split", required=True, help="split name, e.g. train or val")
    write.add_argument("--labels", help="labels file for a flat folder: 'FILENAME CLASS' or 'FILENAME,CLASS' "
                                        "lines; CLASS is a class name or index")
    write.add_argument("--seed", type=int, default=0, help="seed of the write-time sample shuffle")
    write.add_argument("--max-per-shard", type=int, default=1000, help="samples per shard at most")
    write.add_argument("--max-shard-bytes", type=int, default=1 << 30, help="bytes per shard at most")
    write.add_argument("--workers", type=int, default=_default_workers(),
                       help="processes decoding and writing (default: all CPUs)")
    write.add_argument("--name", help="dataset name stored in _info.json (default: OUT_DIR's name)")
    write.add_argument("--no-json", action="store_true", help="omit the KEY.json sidecars (source path, "
                                                                "class name)")
    write.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = write_split(args.src, args.out_dir, args.split, labels=args.labels, seed=args.seed,
                             max_per_shard=args.max_per_shard, max_shard_bytes=args.max_shard_bytes,
                             workers=args.workers, name=args.name, with_json=not args.no_json,
                             progress=not args.quiet)
    except SourceError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{args.split}: {result.num_samples} samples in {len(result.filenames)} shards "
          f"({args.out_dir}/{args.split}-*.tar), {len(result.bad)} file(s) skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
