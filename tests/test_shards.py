"""Shard writer: both source kinds, byte-exact round trip, bad files, errors, timm's reader,
and what an interrupted run leaves behind (a real process killed mid-write)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import encode, image_folder, read_split
from hrnet_cls.atomic import _MODE
from hrnet_cls.shards import SourceError, main, make_keys, write_split

def test_image_folder_round_trip_is_byte_exact(tmp_path: Path) -> None:
    files = image_folder(tmp_path / "src", {"zebra": 5, "ant": 4, "moth": 6})
    result = write_split(tmp_path / "src", tmp_path / "out", "train", max_per_shard=4, workers=2, progress=False)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["class_names"] == ["ant", "moth", "zebra"]  # sorted folder names, as torchvision
    assert info["num_classes"] == 3 and info["name"] == "out"
    assert info["splits"]["train"]["filenames"] == [f"train-{i:06d}.tar" for i in range(4)]
    assert result.shard_lengths == [4, 4, 4, 3] and not result.bad
    samples = read_split(tmp_path / "out", "train")
    seen = {}
    for key, members in samples.items():
        meta = json.loads(members["json"])
        image_ext = next(e for e in members if e not in ("cls", "json"))
        class_name, data = files[meta["filename"]]
        assert members[image_ext] == data  # original bytes, never re-encoded
        assert image_ext == {".jpg": "jpg", ".png": "png", ".webp": "webp"}[Path(meta["filename"]).suffix]
        assert int(members["cls"]) == info["class_names"].index(class_name) and meta["class"] == class_name
        seen[meta["filename"]] = key
    assert sorted(seen) == sorted(files)  # every source image exactly once
    # shards and _info.json published by hrnet_cls.atomic: open()'s mode, no temp file left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_info.json", *info["splits"]["train"]["filenames"]]
    assert {(tmp_path / "out" / n).stat().st_mode & 0o777 for n in os.listdir(tmp_path / "out")} == {_MODE}


def test_same_seed_same_bytes_other_seed_other_order(tmp_path: Path) -> None:
    image_folder(tmp_path / "src", {"a": 6, "b": 6})
    orders = []
    for run, seed in enumerate((1, 1, 2)):
        out = tmp_path / f"out{run}"
        write_split(tmp_path / "src", out, "train", seed=seed, max_per_shard=5, progress=False)
        orders.append([(out / f"train-{i:06d}.tar").read_bytes() for i in range(3)])
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]


def test_flat_folder_with_labels_shares_the_class_list(tmp_path: Path) -> None:
    image_folder(tmp_path / "train", {"cat": 2, "dog": 2, "eel": 2})
    write_split(tmp_path / "train", tmp_path / "out", "train", progress=False)
    (tmp_path / "val").mkdir()
    labels = {"v1.jpg": "eel", "v2.png": "0", "v3.webp": "dog", "v4.jpg": "cat", "v5.jpg": "2"}
    for i, name in enumerate(labels):
        (tmp_path / "val" / name).write_bytes(encode(100 + i, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[
            name.split(".")[1]]))
    # CSV with a header, a comment, whitespace lines, and a name given without extension
    (tmp_path / "labels.txt").write_text(
        "filename,class\n# comment\nv1.jpg,eel\nv2.png 0\n\nv3.webp\tdog\nv4,cat\n\"v5.jpg\",2\n")
    write_split(tmp_path / "val", tmp_path / "out", "val", labels=tmp_path / "labels.txt", progress=False)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["class_names"] == ["cat", "dog", "eel"] and set(info["splits"]) == {"train", "val"}
    got = {json.loads(m["json"])["filename"]: int(m["cls"]) for m in read_split(tmp_path / "out", "val").values()}
    assert got == {"v1.jpg": 2, "v2.png": 0, "v3.webp": 1, "v4.jpg": 0, "v5.jpg": 2}


def test_flat_folder_first_takes_sorted_label_names(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    for i in range(3):
        (tmp_path / "val" / f"x{i}.jpg").write_bytes(encode(i))
    (tmp_path / "labels.txt").write_text("x0.jpg b\nx1.jpg a\nx2.jpg b\n")
    write_split(tmp_path / "val", tmp_path / "out", "val", labels=tmp_path / "labels.txt", progress=False)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["class_names"] == ["a", "b"]


def test_class_outside_the_stored_list_is_an_error_naming_it(tmp_path: Path) -> None:
    image_folder(tmp_path / "train", {"cat": 1, "dog": 1})
    write_split(tmp_path / "train", tmp_path / "out", "train", progress=False)
    image_folder(tmp_path / "more", {"cat": 1, "yak": 1})
    with pytest.raises(SourceError, match="class 'yak' is not in the class list"):
        write_split(tmp_path / "more", tmp_path / "out", "extra", progress=False)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.jpg").write_bytes(encode(0))
    for token in ("yak", "2"):
        (tmp_path / "labels.txt").write_text(f"a.jpg {token}\n")
        with pytest.raises(SourceError, match=rf"labels.txt:1: class '{token}' is neither"):
            write_split(tmp_path / "val", tmp_path / "out", "val", labels=tmp_path / "labels.txt",
                        progress=False)


def test_undecodable_files_are_reported_by_path_and_skipped(tmp_path: Path, caplog) -> None:
    files = image_folder(tmp_path / "src", {"a": 3, "b": 3})
    good = encode(7, size=(64, 48))
    (tmp_path / "src" / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])  # opens, fails to load
    (tmp_path / "src" / "b" / "garbage.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "src" / "b" / "empty.webp").write_bytes(b"")
    with caplog.at_level("WARNING", logger="hrnet_cls.shards"):
        result = write_split(tmp_path / "src", tmp_path / "out", "train", workers=2, progress=False)
    bad = sorted(Path(p).name for p, _ in result.bad)
    assert bad == ["empty.webp", "garbage.png", "truncated.jpg"]
    for name in bad:
        assert name in caplog.text
    names = {json.loads(m["json"])["filename"] for m in read_split(tmp_path / "out", "train").values()}
    assert names == set(files)


def test_max_shard_bytes_bounds_every_shard(tmp_path: Path) -> None:
    image_folder(tmp_path / "src", {"a": 10, "b": 10})
    limit = 6 * 10240  # bytes
    result = write_split(tmp_path / "src", tmp_path / "out", "train", max_shard_bytes=limit, progress=False)
    sizes = [(tmp_path / "out" / f).stat().st_size for f in result.filenames]
    assert len(sizes) > 1 and max(sizes) <= limit
    assert result.num_samples == 20


def test_keys_unique_without_dots_when_stems_collide() -> None:
    keys = make_keys(["a/img.1.jpg", "b/img.1.jpg", "a/x y.png"])
    assert len(set(keys)) == 3 and not any("." in k or "/" in k or " " in k for k in keys)
    assert make_keys(["n1/n1_5.JPEG", "n2/n2_7.JPEG"]) == ["n1_5", "n2_7"]  # ImageNet: the stem


def test_timm_reader_reads_every_sample_with_its_label(tmp_path: Path) -> None:
    import timm.data

    files = image_folder(tmp_path / "src", {"a": 4, "b": 3, "c": 4})
    write_split(tmp_path / "src", tmp_path / "out", "train", max_per_shard=3, progress=False)
    classes = ["a", "b", "c"]
    want = sorted((classes.index(c), np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).tobytes())
                  for c, d in files.values())
    for split in ("train", "train-{000000..000003}.tar"):
        dataset = timm.data.create_dataset("wds/out", root=str(tmp_path / "out"), split=split, is_training=False)
        got = sorted((int(target), np.asarray(img).tobytes()) for img, target in dataset)
        assert got == want


@pytest.mark.slow  # a fresh interpreter imports hrnet_cls (and so timm): about 5 s
def test_cli_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hrnet_cls.shards", "write", str(tmp_path / "nope"),
                           str(tmp_path / "out"), "--split", "train"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such directory"]


@pytest.mark.parametrize("labels_text, message", [
    ("a.jpg cat extra\n", r"labels.txt:1: expected 'FILENAME CLASS'"),
    ("a.jpg cat\nmissing.jpg cat\n", r"labels.txt:2: missing.jpg not found"),
    ("a.jpg cat\na.jpg dog\n", r"labels.txt:2: a.jpg already labelled on line 1"),
    ("a.jpg 0\n", r"labels are class indices but .* holds no class list"),
    ("\n# nothing\n", r"labels.txt: no labels"),
])
def test_bad_labels_file_names_file_and_line(tmp_path: Path, labels_text: str, message: str) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.jpg").write_bytes(encode(0))
    (tmp_path / "labels.txt").write_text(labels_text)
    with pytest.raises(SystemExit, match=message):
        main(["write", str(tmp_path / "val"), str(tmp_path / "out"), "--split", "val", "--labels",
              str(tmp_path / "labels.txt"), "--quiet"])


def test_empty_or_flat_source_without_labels_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(SystemExit, match="empty: no .jpg/.jpeg/.png/.webp files"):
        main(["write", str(tmp_path / "empty"), str(tmp_path / "out"), "--split", "train", "--quiet"])
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(encode(0))
    with pytest.raises(SystemExit, match="pass --labels FILE"):
        main(["write", str(tmp_path / "flat"), str(tmp_path / "out"), "--split", "train", "--quiet"])


def _listed_shards_are_complete(out: Path) -> dict:
    info = json.loads((out / "_info.json").read_text()) if (out / "_info.json").exists() else {}
    for split in info.get("splits", {}).values():
        for name, length in zip(split["filenames"], split["shard_lengths"]):
            with tarfile.open(out / name) as tar:  # raises on a partial file
                assert len({m.name.split(".")[0] for m in tar}) == length
    return info


def _kill_mid_write(src: Path, out: Path) -> None:
    """Run the CLI until it blocks reading a FIFO placed among the images, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-m", "hrnet_cls.shards", "write", str(src), str(out),
                             "--split", "train", "--max-per-shard", "2", "--workers", "1", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob(".train-*.tar.partial")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # let it reach the FIFO
    assert proc.poll() is None, "writer finished although a FIFO blocks it"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # runs the CLI in a fresh interpreter
@pytest.mark.parametrize("previous_run", [False, True], ids=["fresh", "over-complete-run"])
def test_interrupted_run_lists_no_partial_shard_and_rerun_completes(tmp_path: Path, previous_run: bool) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    files = image_folder(src, {"a": 7, "b": 6})
    if previous_run:  # a complete earlier write with more, smaller shards, plus another split
        write_split(src, out, "train", max_per_shard=1, progress=False)
        write_split(src, out, "val", max_per_shard=4, progress=False)
    fifo = src / "b" / "zz_fifo.jpg"
    os.mkfifo(fifo)
    _kill_mid_write(src, out)
    info = _listed_shards_are_complete(out)
    assert "train" not in info.get("splits", {})  # dropped before any old shard was replaced
    assert ("val" in info.get("splits", {})) == previous_run
    fifo.unlink()
    result = write_split(src, out, "train", max_per_shard=2, progress=False)
    _listed_shards_are_complete(out)
    assert not list(out.glob(".*partial"))
    assert sorted(p.name for p in out.glob("train-*.tar")) == result.filenames  # stale ones removed
    names = {json.loads(m["json"])["filename"] for m in read_split(out, "train").values()}
    assert names == set(files)
