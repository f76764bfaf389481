"""Decode one encoded image into a uint8 crop; normalise uint8 batches on their device. Train: RandomResizedCrop + flip,
the box chosen from the header, a draft-scale decode, a torch resize; eval: timm's eval transform pixel for pixel.
Which decoder runs: docs/design.md §5.5, §4.10; speed: BENCHMARKS.md (input pipeline)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel: PIL decodes every image
    simplejpeg = None

__all__ = ["DecodeError", "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "Normalize", "draft_factor", "eval_crop",
           "eval_resize", "random_resized_crop_box", "sample_rng", "train_crop"]

INTERPOLATIONS = ("bilinear", "bicubic")
_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}  # timm's str_to_interp_mode, for PIL
_DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg performs while decoding
_TURBO_COLORSPACES = frozenset({"YCbCr", "Gray", "RGB"})
# PIL on unreadable bytes: OSError (unidentified, truncated), SyntaxError (PNG chunk), ValueError (tile, mode)
_BAD_BYTES = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DecodeError(Exception):
    """Bytes PIL cannot decode: the only failure the loaders replace or skip (our own code's errors propagate)."""


@contextlib.contextmanager
def _decoding():
    """Around PIL's open and load calls only: their bad-bytes errors become DecodeError."""
    try:
        yield
    except _BAD_BYTES as exc:
        raise DecodeError(f"image does not decode ({exc!r})") from exc


def sample_rng(*parts: object) -> random.Random:
    """A generator seeded by a stable hash of ``parts`` (``hash()`` is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a RandomResizedCrop box: ten random tries, then the central box, ratio clamped."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


# integer grayscale wider than 8 bits, which convert("RGB") clips at 255 (shards/README.md, 16-bit images)
WIDE_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def wide_gray_to_uint8(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 of a loaded WIDE_GRAY_MODES image: value >> 8 ("I" clipped into 0..65535 first)."""
    values = np.asarray(img)
    if img.mode == "I":
        values = np.clip(values, 0, 65535)
    return (values >> 8).astype(np.uint8)


def draft_request(width: int, height: int, keep: float) -> tuple[int, int] | None:
    """The size _decode asks ``Image.draft`` for (None: no draft) when the region of interest is ``keep``
    times larger per side than needed: ceil(side / wanted), ``wanted`` the largest of (8, 4, 2) <= keep."""
    if keep < 2:
        return None
    wanted = next(s for s in _DRAFT_SCALES if s <= keep)
    return -(-width // wanted), -(-height // wanted)


def draft_factor(width: int, height: int, keep: float) -> int:
    """The reduction PIL's draft applies for draft_request's size; a request rounded up can leave it a step
    below ``wanted`` (1000x750 at wanted 4: 750 // 188 = 3, factor 2)."""
    request = draft_request(width, height, keep)
    if request is None:
        return 1
    fits = min(width // request[0], height // request[1])
    return next(s for s in (8, 4, 2, 1) if fits >= s)


def draft(img: Image.Image, keep: float) -> int:
    """Set a not yet loaded JPEG to decode at draft_request's scale; returns the factor (1: none)."""
    request = draft_request(img.width, img.height, keep) if img.format == "JPEG" else None
    if request is None:
        return 1
    full_width = img.width
    drafted = img.draft("RGB", request)
    if drafted is None:
        return 1
    return round(full_width / drafted[1][2])  # drafted: (mode, (0, 0, width / factor, height / factor))


def _decode(img: Image.Image, keep: float) -> tuple[np.ndarray, int]:
    """(read-only (H, W, 3) uint8 pixels, reduction factor); ``keep`` as in draft_request."""
    factor = draft(img, keep)
    img.load()
    if img.mode in WIDE_GRAY_MODES:
        pixels = np.repeat(wide_gray_to_uint8(img)[:, :, None], 3, axis=2)
        pixels.flags.writeable = False
        return pixels, factor
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img), factor


def _resize(region: np.ndarray, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """(h, w, 3) uint8 region -> (3, *size) uint8 tensor, antialiased when shrinking."""
    # a writable copy: as (1, 3, h, w) it is channels-last contiguous, interpolate's fast uint8 path
    pixels = torch.from_numpy(np.array(region)).permute(2, 0, 1).unsqueeze(0)
    if tuple(pixels.shape[2:]) == size:
        return pixels[0]
    return F.interpolate(pixels, size=size, mode=interpolation, antialias=True, align_corners=False)[0]


def turbo_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG simplejpeg decodes to PIL's pixels; None where PIL should decode (not a
    JPEG, CMYK / YCCK, MPO, a refused header, a size past PIL's decompression-bomb limit)."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff" or b"MPF\x00" in data:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
        return None
    if colorspace not in _TURBO_COLORSPACES or (Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS):
        return None
    return width, height


def turbo_decode(data: bytes, width: int, height: int, factor: int) -> np.ndarray:
    """(ceil(height / factor), ceil(width / factor), 3) uint8 at PIL's settings; ValueError where libjpeg warns."""
    if factor == 1:
        return simplejpeg.decode_jpeg(data, "RGB")
    # the smallest libjpeg-turbo scale (num/8) keeping ceil(side / factor) pixels is 1/factor
    return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-height // factor), min_width=-(-width // factor))


def crop_resize(pixels: np.ndarray, factor: int, box: tuple[int, int, int, int], flip: bool, size: int,
                interpolation: str) -> torch.Tensor:
    """The original's (left, top, w, h) box from pixels decoded at 1/factor, as (3, size, size) uint8."""
    left, top, w, h = box
    # decoded pixel i covers original pixels [i * f, (i + 1) * f)
    x0, y0 = left // factor, top // factor
    x1, y1 = max(x0 + 1, round((left + w) / factor)), max(y0 + 1, round((top + h) / factor))
    out = _resize(pixels[y0:y1, x0:x1], (size, size), interpolation)
    return out.flip(-1) if flip else out


def train_crop(data: bytes, size: int, rng: random.Random, *, scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
               interpolation: str = "bilinear") -> torch.Tensor:
    """RandomResizedCrop + flip of image bytes -> (3, size, size) uint8, the same pixels from simplejpeg or PIL."""
    header = turbo_header(data)
    if header is not None:
        state = rng.getstate()
        box = random_resized_crop_box(*header, rng, scale, ratio)
        flip = rng.random() < hflip
        factor = draft_factor(*header, min(box[2], box[3]) / size)
        try:
            pixels = turbo_decode(data, *header, factor)
        except (ValueError, RuntimeError):
            rng.setstate(state)  # PIL draws the same box again
        else:
            return crop_resize(pixels, factor, box, flip, size, interpolation)
    return train_crop_pil(data, size, rng, scale=scale, ratio=ratio, hflip=hflip, interpolation=interpolation)


def train_crop_pil(data: bytes, size: int, rng: random.Random, *, scale: tuple[float, float] = (0.08, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                   interpolation: str = "bilinear") -> torch.Tensor:
    """train_crop with PIL decoding every image."""
    with _decoding():
        img = Image.open(io.BytesIO(data))
    box = random_resized_crop_box(img.width, img.height, rng, scale, ratio)
    flip = rng.random() < hflip
    with _decoding():
        pixels, factor = _decode(img, min(box[2], box[3]) / size)
    return crop_resize(pixels, factor, box, flip, size, interpolation)


def eval_resize(img_size: int, crop_pct: float) -> int:
    """The shorter side before the centre crop, floored as timm does (224 at crop_pct 0.95: 235)."""
    return math.floor(img_size / crop_pct)


def _turbo_full(data: bytes) -> np.ndarray | None:
    """The whole image decoded by simplejpeg where it gives PIL's pixels (turbo_header), else None."""
    header = turbo_header(data)
    if header is None:
        return None
    try:
        return turbo_decode(data, *header, 1)
    except (ValueError, RuntimeError):  # libjpeg warned: PIL decides, as in training
        return None


def eval_crop(data: bytes, size: int, resize: int, *, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize the shorter side to ``resize``, centre-crop ``size`` -> (3, size, size) uint8, as timm: full
    decode, PIL's resize (torch's uint8 interpolate differs by up to 2 levels in ~0.6% of pixels)."""
    pixels = _turbo_full(data)
    if pixels is None:
        with _decoding():
            pixels, _ = _decode(Image.open(io.BytesIO(data)), keep=1.0)
    height, width = pixels.shape[:2]
    # output size as torchvision's Resize(int): shorter side = resize, longer side truncated
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    resized = Image.fromarray(pixels).resize((new_w, new_h), _PIL_FILTERS[interpolation])
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = np.asarray(resized.crop((left, top, left + size, top + size)))
    return torch.from_numpy(crop.copy()).permute(2, 0, 1)


class Normalize:
    """uint8 (B, 3, H, W) batches -> float32 (x / 255 - mean) / std, on the batch's device after its copy there,
    with ToTensor + Normalize's float ops: timm's CPU values bit for bit (docs/design.md §5.5). The loaders ship
    uint8 (a quarter of float32's bytes through shared memory, pinning and PCIe, no float math in the workers)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # made once per device

    def __call__(self, images: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
                 ) -> torch.Tensor:
        if images.device not in self._on:
            self._on[images.device] = tuple(torch.tensor(v, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
                                            for v in (self.mean, self.std))
        mean, std = self._on[images.device]
        return images.contiguous(memory_format=memory_format).float().div_(255).sub_(mean).div_(std)
