"""Training JPEGs decoded by simplejpeg (libjpeg-turbo) give exactly PIL's pixels.

``train_crop`` decodes the JPEGs ``turbo_header`` accepts with simplejpeg at the scale PIL's
draft would pick and everything else with PIL (``train_crop_pil``). Here, on real images
written by PIL: the crops are torch.equal to PIL's for the same seeds (4:2:0, 4:2:2, 4:4:4,
progressive, grayscale and RGB JPEGs, at sizes where each draft reduction applies), the decoded
arrays are equal before any resize, the fast path is really the one taken, and CMYK, PNG, MPO,
decompression-bomb sizes, damaged JPEGs and a missing simplejpeg all end up in PIL with PIL's
result or PIL's exception, also through the training loader.
"""
from __future__ import annotations

import functools
import io
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import NUM_CLASSES, epoch_batches, jpeg, same_batches, write_shards
from hrnet_cls.data import sources, transforms
from hrnet_cls.data.transforms import (DecodeError, _decode, crop_resize, draft, draft_factor, random_resized_crop_box,
                                       sample_rng, train_crop, train_crop_pil, turbo_decode, turbo_header)



@functools.lru_cache(maxsize=None)
def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise over gradients and a fine checkerboard: any decoder difference shows in a crop."""
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:height, :width]
    pixels = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    pixels[..., 0] += (xx * 170 // width).astype(np.uint8)
    pixels[..., 1] += (yy * 170 // height).astype(np.uint8)
    pixels[..., 2] += (((xx // 7 + yy // 5) % 2) * 120 + (xx + yy) * 50 // (width + height)).astype(np.uint8)
    return Image.fromarray(pixels)


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# id: (width, height, PIL mode, JPEG save options)
CASES = {
    "420-500x375": (500, 375, "RGB", dict(quality=90)),  # ImageNet's commonest size: draft factors 1, 2, 4
    "444-500x375": (500, 375, "RGB", dict(quality=90, subsampling=0)),
    "422-375x500": (375, 500, "RGB", dict(quality=85, subsampling=1)),
    "progressive-500x375": (500, 375, "RGB", dict(quality=90, progressive=True)),
    "gray-500x375": (500, 375, "L", dict(quality=90)),
    "rgb-500x375": (500, 375, "RGB", dict(quality=90, subsampling=0, keep_rgb=True)),  # Adobe marker, no YCbCr
    "420-1024x768": (1024, 768, "RGB", dict(quality=90)),  # factors 2, 4, 8
    "progressive-1024x768": (1024, 768, "RGB", dict(quality=90, progressive=True)),
    "420-1200x900": (1200, 900, "RGB", dict(quality=90)),  # 900 / 8 rounds up: factors 2, 4
    "420-2000x1500": (2000, 1500, "RGB", dict(quality=90, optimize=True)),
    "444-3000x2000": (3000, 2000, "RGB", dict(quality=90, subsampling=0)),  # factors 2, 4, 8
    # sides not divisible by the wanted reduction: the request rounds up, the factor is one step lower
    "420-1001x751": (1001, 751, "RGB", dict(quality=90)),  # factors 1, 2, 4
    "gray-1001x751": (1001, 751, "L", dict(quality=90)),
    "420-1000x750": (1000, 750, "RGB", dict(quality=90)),  # factors 2, 4
}
COLORSPACES = {"L": "Gray", "RGB": "YCbCr"}  # what PIL writes; keep_rgb=True: "RGB"
SIZES = (448, 224, 96, 48, 24)
INTERPOLATIONS = ("bilinear", "bicubic")


@functools.lru_cache(maxsize=None)
def case_bytes(case: str) -> bytes:
    width, height, mode, options = CASES[case]
    img = textured(width, height)
    return encode(img if mode == "RGB" else img.convert(mode), **options)


def factor_of(width: int, height: int, size: int, seed: tuple) -> int:
    """The draft factor train_crop uses for the crop drawn from sample_rng(*seed)."""
    box = random_resized_crop_box(width, height, sample_rng(*seed))
    return draft_factor(width, height, min(box[2], box[3]) / size)


def test_simplejpeg_is_installed() -> None:
    assert transforms.simplejpeg is not None, "simplejpeg is a dependency (pyproject.toml): training decodes with it"


def seeds_per_factor(case: str, epoch: int, interpolation: str) -> dict[int, tuple[int, tuple]]:
    """{draft factor: (size, sample_rng seed)}: for each reduction the image allows at all
    (draft_factor at keep 1, 2, 4, 8), the first (key, size) whose crop train_crop decodes at it."""
    width, height = CASES[case][:2]
    wanted = {draft_factor(width, height, keep) for keep in (1, 2, 4, 8)}
    found: dict[int, tuple[int, tuple]] = {}
    for key in range(100):
        for size in SIZES:
            seed = (7, epoch, case, key, interpolation)
            found.setdefault(factor_of(width, height, size, seed), (size, seed))
        if wanted <= found.keys():
            return {f: found[f] for f in sorted(wanted)}
    raise AssertionError(f"{case}: no crop at draft factors {wanted - found.keys()}")


@pytest.mark.parametrize("case", CASES)
def test_train_crop_equals_pils_crop_exactly(case: str) -> None:
    width, height = CASES[case][:2]
    data = case_bytes(case)
    assert turbo_header(data) == (width, height)  # simplejpeg decodes it
    for epoch in range(1 if width * height > 2_000_000 else 3):  # the largest images cost the most
        for interpolation in INTERPOLATIONS:
            for factor, (size, seed) in seeds_per_factor(case, epoch, interpolation).items():
                ours = train_crop(data, size, sample_rng(*seed), interpolation=interpolation)
                pils = train_crop_pil(data, size, sample_rng(*seed), interpolation=interpolation)
                assert ours.shape == (3, size, size) and ours.dtype == torch.uint8
                assert torch.equal(ours, pils), (case, factor, size, seed)


@pytest.mark.parametrize("case", CASES)
def test_turbo_decode_equals_pils_draft_decode(case: str) -> None:
    """The decoded arrays themselves, before a resize could average a difference away."""
    width, height = CASES[case][:2]
    data = case_bytes(case)
    for keep in (1, 2, 4, 8):
        pixels, factor = _decode(Image.open(io.BytesIO(data)), keep)
        assert factor == draft_factor(width, height, keep)
        ours = turbo_decode(data, width, height, factor)
        assert ours.shape == pixels.shape == (-(-height // factor), -(-width // factor), 3)
        assert np.array_equal(ours, pixels), (case, keep, factor)


@pytest.mark.parametrize("case", CASES)
def test_the_simplejpeg_path_is_the_one_taken(case: str) -> None:
    width, height, mode, options = CASES[case]
    colorspace = "RGB" if options.get("keep_rgb") else COLORSPACES[mode]
    data = case_bytes(case)
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert transforms.simplejpeg.decode_jpeg_header(data)[2] == colorspace
    assert turbo_header(data) == (width, height)
    for key in range(4):
        seed, size = ("path", case, key), (224, 64, 32, 32)[key]
        rng = sample_rng(*seed)
        box = random_resized_crop_box(width, height, rng)
        flip = rng.random() < 0.5
        factor = draft_factor(width, height, min(box[2], box[3]) / size)
        by_hand = crop_resize(turbo_decode(data, width, height, factor), factor, box, flip, size, "bilinear")
        assert torch.equal(train_crop(data, size, sample_rng(*seed)), by_hand)


# widths and heights as in ImageNet and photo collections, odd ones and small ones
GRID = [(w, h) for w in (500, 1000, 1001, 1200, 3000) for h in (375, 750, 751, 900, 2000)] + [
    (h, w) for w, h in ((500, 375), (1001, 751), (3000, 2000))] + [(17, 13), (64, 48), (255, 129), (16, 1024)]
KEEPS = (1.0, 1.99, 2.0, 2.5, 3.99, 4.0, 4.01, 7.99, 8.0, 8.5, 16.0, 100.0)


def test_draft_factor_is_the_factor_pils_draft_applies() -> None:
    for width, height in GRID:
        data = encode(Image.new("RGB", (width, height), (90, 140, 200)))  # flat: the header is what counts
        assert turbo_header(data) == (width, height)
        for keep in KEEPS:
            img = Image.open(io.BytesIO(data))
            factor = draft(img, keep)
            assert draft_factor(width, height, keep) == factor, (width, height, keep)
            assert img.size == (-(-width // factor), -(-height // factor))  # the size PIL will decode to
            # and the size simplejpeg decodes to for turbo_decode's request
            scaled = transforms.simplejpeg.decode_jpeg_header(data, min_height=-(-height // factor),
                                                               min_width=-(-width // factor))[:2]
            assert scaled == (img.height, img.width), (width, height, keep)
    # the request rounds up for sides not divisible by the wanted reduction (draft_factor's docstring)
    assert [draft_factor(1000, 750, k) for k in (2, 4, 8)] == [2, 2, 4]
    assert [draft_factor(1001, 751, k) for k in (2, 4, 8)] == [1, 2, 4]
    assert [draft_factor(500, 375, k) for k in (2, 4, 8)] == [1, 2, 4]
    assert [draft_factor(1024, 768, k) for k in (1.9, 2, 4, 8)] == [1, 2, 4, 8]


# ---------------------------------------------------------------- what PIL decodes


def mpo_bytes() -> bytes:
    frames = [textured(500, 375, 1), textured(500, 375, 2)]
    return encode(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=90)


OTHERS = {
    "cmyk-jpeg": lambda: encode(textured(500, 375).convert("CMYK"), quality=90),
    "png": lambda: encode(textured(500, 375), "PNG"),
    "mpo": mpo_bytes,
    "webp": lambda: encode(textured(500, 375), "WEBP", quality=90),
}


@pytest.mark.parametrize("kind", OTHERS)
def test_other_images_go_to_pil_with_the_same_crops(kind: str) -> None:
    data = OTHERS[kind]()
    assert turbo_header(data) is None
    if kind == "mpo":
        assert Image.open(io.BytesIO(data)).format == "MPO"  # PIL never drafts it: it decodes in full
    for key in range(4):
        for size in (224, 32):
            seed = (kind, key, size)
            assert torch.equal(train_crop(data, size, sample_rng(*seed)), train_crop_pil(data, size, sample_rng(*seed)))


def test_decompression_bomb_sizes_warn_and_fail_as_in_pil(monkeypatch) -> None:
    data = case_bytes("420-500x375")  # 187,500 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # above it: a warning
    assert turbo_header(data) is None
    with pytest.warns(Image.DecompressionBombWarning):
        ours = train_crop(data, 64, sample_rng("bomb"))
    with pytest.warns(Image.DecompressionBombWarning):
        assert torch.equal(ours, train_crop_pil(data, 64, sample_rng("bomb")))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90_000)  # above twice it: an error
    for crop in (train_crop, train_crop_pil):
        with pytest.raises(DecodeError) as raised:  # a bad sample to the loaders: replaced and counted
            crop(data, 64, sample_rng("bomb"))
        assert isinstance(raised.value.__cause__, Image.DecompressionBombError)


def corrupt_scan(data: bytes) -> bytes:
    """100 bytes of entropy-coded data changed (never into a marker): libjpeg warns; PIL decodes
    this one from a 500x375 image (it refuses others, e.g. "broken data stream")."""
    out = bytearray(data)
    start = data.find(b"\xff\xda") + 2000
    for i in range(start, start + 100):
        if out[i] != 0xFF and out[i] ^ 0x5A != 0xFF:
            out[i] ^= 0x5A
    return bytes(out)


# id: (damage, whether simplejpeg reads the header and so tries first, PIL's result: strict, LOAD_TRUNCATED_IMAGES)
DAMAGED = {
    "truncated-half": (lambda d: d[: len(d) // 2], True, ("raises", "pixels")),
    "no-eoi": (lambda d: d[:-2], True, ("pixels", "pixels")),
    "corrupt-scan": (corrupt_scan, True, ("pixels", "pixels")),
    "header-only": (lambda d: d[:300], False, ("raises", "raises")),  # as in test_data.broken_dataset
    "zero-filled": (lambda d: d[:200] + bytes(len(d) - 200), False, ("raises", "raises")),
    "soi-then-junk": (lambda d: b"\xff\xd8 also junk", False, ("raises", "raises")),
}


def outcome(crop, data: bytes, rng: random.Random):
    """The crop, or the exception's type, its cause's type and its message; plus the generator's
    state afterwards."""
    try:
        result = crop(data, 64, rng)
    except Exception as exc:  # noqa: BLE001 - any type PIL raises must be raised the same way
        msg = str(exc).split(" <")[0]  # UnidentifiedImageError names the BytesIO object
        return (type(exc), type(exc.__cause__), msg), rng.getstate()
    return result, rng.getstate()


@pytest.mark.parametrize("load_truncated", [False, True], ids=["strict", "LOAD_TRUNCATED_IMAGES"])
@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_jpeg_gives_what_pil_gives(kind: str, load_truncated: bool, monkeypatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    damage, header_reads, results = DAMAGED[kind]
    data = damage(case_bytes("420-500x375"))
    assert (turbo_header(data) is not None) == header_reads
    if header_reads:  # simplejpeg is strict: it refuses what libjpeg warns about, and PIL decides
        with pytest.raises(ValueError):
            turbo_decode(data, 500, 375, 1)
    for key in range(3):
        ours, ours_state = outcome(train_crop, data, sample_rng(kind, key))
        pils, pils_state = outcome(train_crop_pil, data, sample_rng(kind, key))
        assert ("pixels" if isinstance(pils, torch.Tensor) else "raises") == results[load_truncated]
        if isinstance(pils, torch.Tensor):
            assert isinstance(ours, torch.Tensor) and torch.equal(ours, pils)
        else:
            assert ours == pils
            assert pils[0] is DecodeError and issubclass(pils[1], OSError)  # what the loaders catch and count
        assert ours_state == pils_state  # the same draws: PIL's box is the one simplejpeg would have cut


def test_without_simplejpeg_pil_decodes_everything(monkeypatch) -> None:
    data = case_bytes("420-1200x900")
    seeds = [("off", key, size) for key in range(3) for size in SIZES]
    with_turbo = [train_crop(data, seed[2], sample_rng(*seed)) for seed in seeds]
    monkeypatch.setattr(transforms, "simplejpeg", None)
    assert turbo_header(data) is None
    for seed, expected in zip(seeds, with_turbo):
        size = seed[2]
        crop = train_crop(data, size, sample_rng(*seed))
        assert torch.equal(crop, expected) and torch.equal(crop, train_crop_pil(data, size, sample_rng(*seed)))


# ---------------------------------------------------------------- through the training loader


def test_the_training_loader_counts_damaged_jpegs_as_before(tmp_path, monkeypatch, caplog) -> None:
    good = [encode(textured(120, 90, 10 + i), quality=90) for i in range(9)]
    samples = [(f"g{i:03d}", {"jpg": data, "cls": str(i % NUM_CLASSES).encode()}) for i, data in enumerate(good)]
    samples += [("truncated", {"jpg": good[0][: len(good[0]) // 2], "cls": b"1"}),  # simplejpeg tries, PIL fails
                ("header-only", {"jpg": jpeg(0)[:300], "cls": b"2"}),  # nobody decodes it
                ("corrupt", {"jpg": corrupt_scan(case_bytes("420-500x375")), "cls": b"3"})]  # PIL decodes it
    assert turbo_header(samples[9][1]["jpg"]) and turbo_header(samples[11][1]["jpg"])  # simplejpeg tries these
    urls = write_shards(tmp_path, "train", [samples[:6], samples[6:]])
    for name, value in (("burst", 10**6), ("count", 0), ("held", 0), ("last", 0.0)):
        # every warning logged; restored afterwards, so no later test finds the burst used up
        monkeypatch.setattr(sources.warn, name, value)
    runs = []
    for turbo in (True, False):  # False: the PIL-only pipeline that was there before simplejpeg
        if not turbo:
            monkeypatch.setattr(transforms, "simplejpeg", None)
        with caplog.at_level(logging.WARNING, logger="hrnet_cls.data"):
            caplog.clear()
            runs.append((epoch_batches(urls, batch_size=4, img_size=16), caplog.text))
    (turbo_batches, turbo_log), (pil_batches, pil_log) = runs
    assert len(turbo_batches) == 3 and same_batches(turbo_batches, pil_batches)
    assert [(skipped, positions.tolist()) for _, _, skipped, positions in turbo_batches] == \
           [(skipped, positions.tolist()) for _, _, skipped, positions in pil_batches]
    assert sum(skipped for _, _, skipped, _ in turbo_batches) == 2  # the corrupt scan still decodes, as in PIL
    for log in (turbo_log, pil_log):
        assert "sample truncated: image does not decode" in log and "sample header-only: image does not decode" in log
        assert "sample corrupt" not in log
