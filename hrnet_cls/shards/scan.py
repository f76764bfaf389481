"""Source images for the shard writer (an ImageFolder tree, or a flat folder plus a labels file) as the items
(path, class, sample key) to write; the rules are in shards/README.md, "Writing shards"."""
from __future__ import annotations

import csv
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("hrnet_cls.shards")

SOURCE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
_HEADER_WORDS = ({"filename", "file", "image", "path", "name"}, {"class", "label", "target"})
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # webdataset cuts keys at the first dot and reads '/' as a folder


class SourceError(ValueError):
    """A problem with SRC, the labels file or OUT_DIR that the user must fix (one line)."""


@dataclass(frozen=True)
class Item:
    """One source image planned into a shard."""

    path: str  # absolute source path
    rel: str  # path relative to SRC, kept in the json sidecar
    label: int
    class_name: str
    key: str  # webdataset sample key: unique within the split, no dots
    nbytes: int  # file size, for --max-shard-bytes


@dataclass
class ScanReport:
    """What the scan left out of SRC, each already logged as one warning line."""

    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable entries
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, path kept): same real file


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in SOURCE_SUFFIXES


def _dangling(path: Path | str) -> bool:
    """A symlink whose target does not exist (a loop of file links counts too)."""
    return os.path.islink(path) and not os.path.exists(path)


def _skip_dangling(path: Path | str, report: ScanReport) -> None:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    logger.warning("skipped dangling symlink %s -> %s (target not found)", path, target)
    report.skipped.append((str(path), f"dangling symlink to {target}"))


def _dir_id(path: str) -> tuple[int, int]:
    st = os.stat(path)  # follows symlinks: the real directory
    return st.st_dev, st.st_ino


class _TreeWalk:
    """Image files below the class folders, each real directory (st_dev, st_ino) entered once; symlinked folders
    are followed after all real ones (pass 2), so a tree's own folders are its files' real location, and a
    link back to SRC, a class folder or an ancestor is a loop, reported and not followed."""

    def __init__(self, src: Path, report: ScanReport) -> None:
        self.src, self.report = src, report
        self.seen: dict[tuple[int, int], str] = {_dir_id(str(src)): "."}  # real dir -> path met first
        self.links: deque[tuple[str, str]] = deque()  # (symlinked dir, class): followed in pass 2
        # (rel, class, real path, direct): direct = no symlink on the way below the class folder
        self.files: list[tuple[str, str, str, bool]] = []

    def add_class(self, name: str) -> None:
        path = str(self.src / name)
        dir_id = _dir_id(path)
        if dir_id in self.seen:
            logger.warning("class folder %s is the same directory as %s; its images are not "
                           "written twice", path, self.seen[dir_id])
            return
        self.seen[dir_id] = name
        self._walk(path, name, direct=True)

    def follow_links(self) -> None:
        while self.links:
            link, class_name = self.links.popleft()
            rel = os.path.relpath(link, self.src)
            target = os.path.realpath(link)
            try:
                dir_id = _dir_id(link)
            except OSError as exc:  # gone meanwhile, or a loop of links
                logger.warning("symlinked folder %s not followed: %s", link, exc)
                continue
            if dir_id in self.seen:
                parent = os.path.realpath(os.path.dirname(link))
                if os.path.commonpath([parent, target]) == target:
                    logger.warning("symlink loop: %s -> %s points back to a folder containing it; "
                                   "not followed", rel, target)
                else:
                    logger.warning("symlinked folder %s -> %s: already scanned as %s; not followed again",
                                   rel, target, self.seen[dir_id])
                continue
            self.seen[dir_id] = rel
            self._walk(link, class_name, direct=False)

    def _walk(self, folder: str, class_name: str, direct: bool) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            logger.warning("folder %s not read: %s", folder, exc)
            return
        real_folder = os.path.realpath(folder)  # once per folder: a plain file's real path is below it
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path, is_link = entry.path, entry.is_symlink()
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_link and is_dir:
                self.links.append((path, class_name))
            elif is_dir:
                dir_id = _dir_id(path)
                if dir_id not in self.seen:  # a second path without a link: a bind mount
                    self.seen[dir_id] = os.path.relpath(path, self.src)
                    self._walk(path, class_name, direct)
            elif _is_image_name(entry.name):
                if is_link and not os.path.exists(path):
                    _skip_dangling(path, self.report)
                else:
                    real = os.path.realpath(path) if is_link else os.path.join(real_folder, entry.name)
                    self.files.append((os.path.relpath(path, self.src), class_name, real,
                                       direct and not is_link))
            elif is_link and not os.path.exists(path):
                logger.warning("dangling symlink %s -> %s not followed (target not found)",
                               path, os.readlink(path))


def _drop_same_files(src: Path, found: list[tuple[str, str, str, bool]], report: ScanReport,
                     ) -> list[tuple[str, str]]:
    """(rel, class) with one path per real file (the first free of symlinks, else the first met); others logged."""
    first: dict[str, int] = {}  # real path -> index of the path kept
    for i, (_, _, real, direct) in enumerate(found):
        if real not in first or (direct and not found[first[real]][3]):
            first[real] = i
    kept = []
    for i, (rel, class_name, real, _) in enumerate(found):
        keep = found[first[real]][0]
        if first[real] == i:
            kept.append((rel, class_name))
        else:
            logger.warning("%s is the same file as %s (real path %s); written once, as %s",
                           src / rel, src / keep, real, keep)
            report.duplicates.append((str(src / rel), str(src / keep)))
    return kept


def scan_image_folder(src: Path, report: ScanReport | None = None) -> dict[str, list[str]]:
    """{class folder name: image paths relative to SRC} for an ImageFolder tree; dangling symlinks, loops and
    second paths to a file are logged and recorded in ``report``."""
    report = ScanReport() if report is None else report
    entries = sorted(src.iterdir())
    classes = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
    for p in entries:  # loose files are no samples here; a dangling link may be a lost class
        if not p.name.startswith(".") and _dangling(p):
            logger.warning("dangling symlink %s -> %s not followed (target not found)", p, os.readlink(p))
    if not classes:
        loose = any(_is_image_name(p.name) for p in entries if p.is_file())
        hint = "; pass --labels FILE for a flat folder" if loose else ""
        raise SourceError(f"{src}: no class sub-folders with images{hint}")
    walk = _TreeWalk(src, report)
    for name in classes:
        walk.add_class(name)
    walk.follow_links()
    found: dict[str, list[str]] = {name: [] for name in classes}
    for rel, class_name in _drop_same_files(src, walk.files, report):
        found[class_name].append(rel)
    found = {name: sorted(rels) for name, rels in found.items()}
    if not any(found.values()):
        raise SourceError(f"{src}: no .jpg/.jpeg/.png/.webp files in its class folders")
    empty = [name for name, files in found.items() if not files]
    if empty:
        logger.warning("%d class folder(s) hold no images, e.g. %s", len(empty), empty[0])
    return found


def read_labels(path: Path) -> list[tuple[str, str, int]]:
    """(filename, class token, line number) per ``FILENAME CLASS`` or ``FILENAME,CLASS`` line of a labels file;
    blank lines, ``#`` comments and a header are ignored."""
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
                if not rows and all(f.lower() in words for f, words in zip(fields, _HEADER_WORDS)):
                    continue
                rows.append((fields[0], fields[1], lineno))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    if not rows:
        raise SourceError(f"{path}: no labels in the file")
    return rows


def _stem_index(src: Path) -> dict[str, str | None]:
    """{file stem: file name} of SRC's top-level images, dangling links included; None for an ambiguous stem."""
    index: dict[str, str | None] = {}
    for p in src.iterdir():
        if (p.is_file() or _dangling(p)) and _is_image_name(p.name):
            index[p.stem] = None if p.stem in index else p.name
    return index


def match_labelled_files(src: Path, labels: Path, report: ScanReport | None = None,
                         ) -> list[tuple[str, str, int]]:
    """(path relative to SRC, class token, line number) per labels-file line (a unique stem may omit its
    extension); dangling symlinks and second names of a file are logged, recorded in ``report``, left out."""
    report = ScanReport() if report is None else report
    stems = _stem_index(src)
    rows, used, reals = [], {}, {}
    for name, token, lineno in read_labels(labels):
        stem = Path(name).stem if Path(name).suffix.lower() in SOURCE_SUFFIXES else name
        rel = name if (src / name).is_file() or _dangling(src / name) else stems.get(stem)
        if rel in used:
            raise SourceError(f"{labels}:{lineno}: {name} already labelled on line {used[rel]}")
        if rel is not None and _dangling(src / rel):
            used[rel] = lineno
            _skip_dangling(src / rel, report)
            continue
        if rel is None or not (src / rel).is_file():
            raise SourceError(f"{labels}:{lineno}: {name} not found in {src}")
        used[rel] = lineno
        real = os.path.realpath(src / rel)
        if real in reals:
            kept, kept_line = reals[real]
            logger.warning("%s:%d: %s is the same file as %s (line %d, real path %s); written once",
                           labels, lineno, src / rel, src / kept, kept_line, real)
            report.duplicates.append((str(src / rel), str(src / kept)))
            continue
        reals[real] = rel, lineno
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


def make_keys(rels: Sequence[str]) -> list[str]:
    """Unique sample keys: file stems if unique in the split, else paths, _KEY_UNSAFE characters made '_'."""
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


def collect_items(src: Path, labels: Path | None, class_names: list[str] | None,
                  info_path: Path, report: ScanReport | None = None) -> tuple[list[Item], list[str]]:
    """Source images with class indices, and the class list OUT_DIR will store; ``class_names``: the list it
    stores already (None: fresh). Files the scan leaves out are recorded in ``report``."""
    if labels is None:
        by_class = scan_image_folder(src, report)
        if class_names is None:
            class_names = list(by_class)
        lookup = {name: i for i, name in enumerate(class_names)}
        unknown = [name for name in by_class if name not in lookup]
        if unknown:
            raise SourceError(f"{src / unknown[0]}: class {unknown[0]!r} is not in the class list "
                              f"of {info_path} ({len(class_names)} classes)")
        rels = [rel for files in by_class.values() for rel in files]
        indices = [lookup[name] for name, files in by_class.items() for _ in files]
    else:
        rows = match_labelled_files(src, labels, report)
        if not rows:
            raise SourceError(f"{labels}: none of its files is readable in {src}")
        if class_names is None:
            if all(token.isdigit() for _, token, _ in rows):
                raise SourceError(f"{labels}: labels are class indices but {info_path} holds no class "
                                  "list yet; write the ImageFolder split into OUT_DIR first")
            class_names = sorted({token for _, token, _ in rows})
        lookup = {name: i for i, name in enumerate(class_names)}
        rels = [r for r, _, _ in rows]
        indices = [_token_to_index(t, lookup, f"{labels}:{n}", info_path) for _, t, n in rows]
    return [Item(str((src / rel).resolve()), rel, label, class_names[label], key, os.path.getsize(src / rel))
            for rel, label, key in zip(rels, indices, make_keys(rels))], class_names
