"""Source images for the shard writer: an ImageFolder tree or a flat folder plus a labels
file, turned into the list of items (path, class, sample key) to write."""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("hrnet_cls.shards")

SOURCE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
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


# ---------------------------------------------------------------- sample keys


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
