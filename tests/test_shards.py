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

from hrnet_cls.shards import SourceError, main, make_keys, write_split

FORMATS = (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"))


def encode(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (14, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def image_folder(root: Path, per_class: dict[str, int]) -> dict[str, tuple[str, bytes]]:
    """An ImageFolder tree cycling through JPEG/PNG/WebP; {relative path: (class, bytes)}."""
    files, seed = {}, 0
    for name, count in per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            fmt, ext = FORMATS[seed % 3]
            rel = f"{name}/{name}_{i}{ext}"
            files[rel] = (name, encode(seed, fmt))
            (root / rel).write_bytes(files[rel][1])
            seed += 1
    return files


def read_split(out: Path, split: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over the split's shards listed in _info.json."""
    info = json.loads((out / "_info.json").read_text())["splits"][split]
    samples: dict[str, dict[str, bytes]] = {}
    for name, length in zip(info["filenames"], info["shard_lengths"]):
        with tarfile.open(out / name) as tar:
            keys = set()
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
                keys.add(key)
        assert len(keys) == length
    assert sum(info["shard_lengths"]) == info["num_samples"] == len(samples)
    return samples


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


# ---------------------------------------------------------------- symlinks in the source


def samples_by_filename(out: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    """{json filename: members} over the split; fails if a source path was written twice."""
    samples = list(read_split(out, split).values())
    names = [json.loads(m["json"])["filename"] for m in samples]
    assert len(names) == len(set(names))
    return dict(zip(names, samples))


def test_dangling_symlink_is_named_skipped_and_counted(tmp_path: Path, caplog, capsys) -> None:
    src = tmp_path / "src"
    files = image_folder(src, {"a": 3, "b": 2})
    os.symlink(tmp_path / "gone" / "x.jpg", src / "a" / "broken.jpg")  # absolute, target missing
    os.symlink("self.png", src / "b" / "self.png")  # a link to itself: no target either
    with caplog.at_level("WARNING", logger="hrnet_cls.shards"):
        assert main(["write", str(src), str(tmp_path / "out"), "--split", "train", "--workers", "1",
                     "--quiet"]) == 0
    lines = [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()]
    assert len(lines) == 1 and str(tmp_path / "gone" / "x.jpg") in lines[0]  # link and target, once
    assert sum("self.png" in r.getMessage() for r in caplog.records) == 1
    assert set(samples_by_filename(tmp_path / "out")) == set(files)  # the rest is written
    assert capsys.readouterr().out.strip().endswith(f"{len(files)} samples in 1 shards "
                                                    f"({tmp_path / 'out'}/train-*.tar), 2 file(s) skipped")


def test_dangling_symlink_in_a_labels_file_is_skipped(tmp_path: Path, caplog) -> None:
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v1.jpg").write_bytes(encode(1))
    (tmp_path / "val" / "v2.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "labels.txt").write_text("v1.jpg cat\nv2 dog\n")  # v2: by stem
    with caplog.at_level("WARNING", logger="hrnet_cls.shards"):
        result = write_split(tmp_path / "val", tmp_path / "out", "val", labels=tmp_path / "labels.txt",
                             progress=False)
    assert [Path(p).name for p, _ in result.bad] == ["v2.jpg"] and "nowhere.jpg" in caplog.text
    assert set(samples_by_filename(tmp_path / "out", "val")) == {"v1.jpg"}


@pytest.mark.parametrize("link, target", [("a/self", "."), ("a/sub/up", ".."), ("a/root", ".."),
                                          ("a/deep/root", "../.."), ("a/to_b", "../b")],
                         ids=["class", "class-from-sub", "root", "root-from-sub", "sibling-class"])
def test_directory_symlink_loop_yields_each_file_once(tmp_path: Path, caplog, link: str, target: str) -> None:
    src = tmp_path / "src"
    files = image_folder(src, {"a": 3, "b": 2})
    (src / "a" / "sub").mkdir()
    (src / "a" / "deep").mkdir()
    (src / "a" / "sub" / "s.jpg").write_bytes(encode(50))
    files["a/sub/s.jpg"] = ("a", encode(50))
    os.symlink(target, src / link)  # relative to the link's folder: "." is a, ".." from a is SRC
    with caplog.at_level("WARNING", logger="hrnet_cls.shards"):
        result = write_split(src, tmp_path / "out", "train", progress=False)
    got = samples_by_filename(tmp_path / "out")
    assert set(got) == set(files) and result.num_samples == len(files)  # each file exactly once
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    for name, members in got.items():  # under its own class, not the linking one
        assert info["class_names"][int(members["cls"])] == files[name][0]
    assert link.split("/")[-1] in caplog.text
    assert ("symlink loop" in caplog.text) == (link != "a/to_b")
    assert not result.bad


def test_symlinked_folders_and_files_outside_the_tree_are_followed_once(tmp_path: Path, caplog) -> None:
    src, ext, cls_c = tmp_path / "src", tmp_path / "ext", tmp_path / "c_elsewhere"
    files = image_folder(src, {"a": 2, "b": 2})
    for folder, seed in ((ext, 60), (cls_c, 65)):
        folder.mkdir()
        for i in range(2):
            (folder / f"{folder.name}{i}.png").write_bytes(encode(seed + i, "PNG"))
    (tmp_path / "one.jpg").write_bytes(encode(70))
    os.symlink(ext, src / "a" / "ext")  # followed ...
    os.symlink(ext, src / "b" / "ext_again")  # ... once: the second link to it is reported
    os.symlink(cls_c, src / "a" / "to_c")  # the real folder of class c: c keeps its files
    os.symlink(tmp_path / "one.jpg", src / "b" / "linked.jpg")  # a symlinked image is an image
    (src / "c").symlink_to(cls_c)  # a symlinked class folder
    with caplog.at_level("WARNING", logger="hrnet_cls.shards"):
        write_split(src, tmp_path / "out", "train", progress=False)
    got = samples_by_filename(tmp_path / "out")
    assert set(got) == set(files) | {"a/ext/ext0.png", "a/ext/ext1.png", "b/linked.jpg",
                                     "c/c_elsewhere0.png", "c/c_elsewhere1.png"}
    assert got["b/linked.jpg"]["jpg"] == (tmp_path / "one.jpg").read_bytes()
    assert got["a/ext/ext1.png"]["png"] == (ext / "ext1.png").read_bytes()
    assert {int(got[f"c/c_elsewhere{i}.png"]["cls"]) for i in range(2)} == {2}
    assert "b/ext_again" in caplog.text and "already scanned as a/ext" in caplog.text
    assert "a/to_c" in caplog.text and "already scanned as c" in caplog.text
    assert "symlink loop" not in caplog.text


def test_two_paths_to_one_file_give_one_sample(tmp_path: Path, caplog, capsys) -> None:
    src = tmp_path / "src"
    files = image_folder(src, {"a": 2, "b": 2})
    os.symlink("a_0.jpg", src / "a" / "0_alias.jpg")  # sorts first, but the real path wins
    os.symlink("../a/a_1.png", src / "b" / "b_from_a.png")  # another class: a keeps it
    os.symlink(src / "b" / "b_0.webp", src / "b" / "zz.webp")
    with caplog.at_level("WARNING", logger="hrnet_cls.shards"):
        assert main(["write", str(src), str(tmp_path / "out"), "--split", "train", "--workers", "1",
                     "--quiet"]) == 0
    got = samples_by_filename(tmp_path / "out")
    assert set(got) == set(files)
    assert int(got["a/a_1.png"]["cls"]) == 0
    for name in ("0_alias.jpg", "b_from_a.png", "zz.webp"):
        assert name in caplog.text
    assert capsys.readouterr().out.strip().endswith("0 file(s) skipped, 3 duplicate path(s) left out")
    # a labels file naming one file twice under two names: one sample as well
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v1.jpg").write_bytes(encode(1))
    os.symlink("v1.jpg", tmp_path / "val" / "v1_copy.jpg")
    (tmp_path / "labels.txt").write_text("v1_copy.jpg a\nv1.jpg b\n")
    result = write_split(tmp_path / "val", tmp_path / "out", "val", labels=tmp_path / "labels.txt",
                         progress=False)
    assert set(samples_by_filename(tmp_path / "out", "val")) == {"v1_copy.jpg"}  # the first line
    assert [Path(p).name for p, _ in result.duplicates] == ["v1.jpg"] and not result.bad


# ---------------------------------------------------------------- 16-bit images


def png_bytes(pixels: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written from the spec (PIL writes no 16-bit RGB/RGBA/LA): (H, W[, C]) uint16;
    color type 0 gray, 2 RGB, 4 gray + alpha, 6 RGBA."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


# 16 x 16 values: the edges of each 8-bit step (0, 255, 256, 32767, 32768, 65280, 65535) and a
# ramp over the whole range; the 8-bit value expected is value >> 8 (65535 -> 255, 32768 -> 128)
GRADIENT16 = np.concatenate([[0, 255, 256, 511, 32767, 32768, 65279, 65280, 65534, 65535],
                             np.linspace(0, 65535, 246).round()]).astype(np.uint16).reshape(16, 16)
EXPECTED8 = (GRADIENT16 >> 8).astype(np.uint8)


def test_16bit_grayscale_png_round_trips_to_8bit(tmp_path: Path) -> None:
    from hrnet_cls.data.transforms import eval_crop

    src = tmp_path / "src"
    (src / "g").mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(GRADIENT16).save(buf, "PNG")
    png16 = buf.getvalue()
    assert Image.open(io.BytesIO(png16)).mode == "I;16"  # what PIL opens a 16-bit gray PNG as
    assert np.asarray(Image.open(io.BytesIO(png16)).convert("RGB"))[0, 2, 0] == 255  # the bug: 256 clipped
    (src / "g" / "gray16.png").write_bytes(png16)
    jpeg8 = encode(3, "JPEG", (16, 16))
    (src / "g" / "photo.jpg").write_bytes(jpeg8)
    write_split(src, tmp_path / "out", "train", progress=False)
    got = samples_by_filename(tmp_path / "out")
    assert got["g/photo.jpg"]["jpg"] == jpeg8  # an 8-bit JPEG: still the source bytes
    stored = got["g/gray16.png"]["png"]
    with Image.open(io.BytesIO(stored)) as img:
        assert img.format == "PNG" and img.mode == "L"
        assert np.array_equal(np.asarray(img), EXPECTED8)  # exact: value >> 8, no rounding
    # the reader, on the stored 8-bit PNG and on 16-bit bytes from another writer: exact too
    # (size == resize == the image side, so no interpolation touches the values)
    for data in (stored, png16):
        crop = eval_crop(data, 16, 16).permute(1, 2, 0).numpy()
        assert np.array_equal(crop, np.repeat(EXPECTED8[:, :, None], 3, axis=2))


def test_decode_scales_every_wide_integer_gray_mode() -> None:
    from hrnet_cls.data.transforms import _decode

    expected = np.repeat(EXPECTED8[:, :, None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(GRADIENT16).save(buf, "PNG")
    pixels, factor = _decode(Image.open(io.BytesIO(buf.getvalue())), 1.0)  # a 16-bit PNG given directly
    assert factor == 1 and pixels.dtype == np.uint8 and np.array_equal(pixels, expected)
    assert not pixels.flags.writeable  # as for every other mode
    big_endian = Image.fromarray(GRADIENT16.astype(">u2"))
    wide = GRADIENT16.astype(np.int32)
    wide[0, 0], wide[0, 1] = -5, 70000  # "I" outside 0..65535: clipped to 0 and 255
    as_int32 = Image.fromarray(wide)
    assert (big_endian.mode, as_int32.mode) == ("I;16B", "I")
    for img, want in ((big_endian, expected), (as_int32, expected.copy())):
        if img.mode == "I":
            want[0, 0], want[0, 1] = 0, 255
        assert np.array_equal(_decode(img, 1.0)[0], want)


def test_16bit_rgb_and_gray_alpha_pngs_already_decode_to_8bit_and_are_copied(tmp_path: Path) -> None:
    from hrnet_cls.data.transforms import _decode

    gray = GRADIENT16
    rgb = np.stack([gray, gray[::-1], gray.T], -1)
    cases = {"rgb48.png": (png_bytes(rgb, 2), "RGB", rgb),
             "rgba64.png": (png_bytes(np.concatenate([rgb, gray[..., None]], -1), 6), "RGBA", rgb),
             "gray_alpha32.png": (png_bytes(np.stack([gray, gray], -1), 4), "RGBA",
                                  np.repeat(gray[..., None], 3, -1))}
    (tmp_path / "src" / "c").mkdir(parents=True)
    for name, (data, mode, channels) in cases.items():
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.mode == mode  # PIL reduces 16-bit samples itself, keeping the high byte:
        assert np.array_equal(np.asarray(img)[..., :3], channels >> 8)  # value >> 8, exact
        assert np.array_equal(_decode(Image.open(io.BytesIO(data)), 1.0)[0], channels >> 8)
        (tmp_path / "src" / "c" / name).write_bytes(data)
    write_split(tmp_path / "src", tmp_path / "out", "train", progress=False)
    got = samples_by_filename(tmp_path / "out")
    for name, (data, _, _) in cases.items():
        assert got[f"c/{name}"]["png"] == data  # not re-encoded: PIL already reads them right


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"),
                                       ("CMYK", "JPEG"), ("RGB", "WEBP")])
def test_8bit_modes_decode_as_before_and_are_copied(tmp_path: Path, mode: str, fmt: str) -> None:
    from hrnet_cls.data.transforms import _decode

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    rgb.convert(mode).save(buf, fmt)
    data = buf.getvalue()
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    assert decoded.mode == mode  # what each decodes to; convert("RGB") handles all of them
    assert np.array_equal(_decode(Image.open(io.BytesIO(data)), 1.0)[0], np.asarray(decoded.convert("RGB")))
    (tmp_path / "src" / "c").mkdir(parents=True)
    (tmp_path / "src" / "c" / f"x.{fmt.lower()}").write_bytes(data)
    write_split(tmp_path / "src", tmp_path / "out", "train", progress=False)
    (members,) = read_split(tmp_path / "out", "train").values()
    assert members[{"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]] == data
