"""Shard writer sources the real world has: symlinks (dangling, looping, duplicated) and
16-bit images, read back from the written shards."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import encode, image_folder, read_split
from hrnet_cls.shards import main, write_split


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
