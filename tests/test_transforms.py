"""Evaluation preprocessing against timm's own transform: pixel for pixel, float for float."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from conftest import jpeg, write_shards
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_val_loader
from hrnet_cls.data.transforms import Normalize, eval_crop, eval_resize
from hrnet_cls.data import transforms

# (img_size, crop_pct) pairs where round() and floor() of img_size / crop_pct differ, and two where they agree
PAIRS = [(224, 0.95), (224, 0.9), (320, 0.95), (240, 0.95), (128, 0.95), (224, 0.875), (32, 1.0)]


def photo(seed: int, size: tuple[int, int]) -> bytes:
    """A photo-like JPEG (smooth gradients plus noise), so that resampling filters matter."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([np.sin(xx / (7 + c) + c) * np.cos(yy / (11 - c)) for c in range(3)], -1) * 100 + 128
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ours(data: bytes, size: int, crop: float, interpolation: str) -> torch.Tensor:
    """Our evaluation crop (uint8, from a worker) normalised as on the device (the CPU here)."""
    pixels = eval_crop(data, size, eval_resize(size, crop), interpolation=interpolation)
    return Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(pixels[None])[0]


def timms(data: bytes, size: int, crop: float, interpolation: str) -> torch.Tensor:
    transform = create_transform(input_size=size, is_training=False, crop_pct=crop, interpolation=interpolation,
                                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return transform(Image.open(io.BytesIO(data)).convert("RGB"))


def test_the_resize_is_floored_as_timm_floors_it() -> None:
    assert [eval_resize(s, c) for s, c in PAIRS[:5]] == [235, 248, 336, 252, 134]
    assert [round(s / c) for s, c in PAIRS[:5]] == [236, 249, 337, 253, 135]  # what a round() would give
    assert all(eval_resize(s, c) == math.floor(s / c) for s, c in PAIRS)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size, crop", PAIRS)
def test_eval_preprocessing_equals_timms_transform_exactly(size: int, crop: float, interpolation: str) -> None:
    for seed, shape in enumerate([(500, 375), (375, 500), (333, 333), (640, 427)]):  # landscape, portrait, square
        data = photo(seed, shape)
        assert transforms._turbo_full(data) is not None  # decoded by simplejpeg, PIL's pixels all the same
        got, expected = ours(data, size, crop, interpolation), timms(data, size, crop, interpolation)
        assert got.shape == expected.shape == (3, size, size)
        assert torch.equal(got, expected), (seed, (got - expected).abs().max().item())


def test_the_val_loader_yields_timms_tensors(tmp_path) -> None:
    samples = [(f"p{i}", {"jpg": photo(i, (500, 375)) if i % 2 else jpeg(i, (300, 420)), "cls": b"1"})
               for i in range(6)]
    urls = write_shards(tmp_path, "val", [samples[:4], samples[4:]])
    for size, crop in [(224, 0.95), (128, 0.9)]:
        loader = build_val_loader(urls, batch_size=4, img_size=size, crop_pct=crop, workers=0)
        images = loader.normalize(torch.cat([b[0] for b in loader]))  # uint8 from the workers, normalised on the device
        expected = torch.stack([timms(s[1]["jpg"], size, crop, "bilinear") for s in samples])
        assert torch.equal(images, expected)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_device_normalisation_is_torchvisions_to_tensor_and_normalize_bit_for_bit(layout) -> None:
    """The loaders ship uint8; the train step and evaluation normalise after the copy to the device. The
    values are those ToTensor + Normalize give each image (what the workers computed before)."""
    import torchvision.transforms.functional as TF

    batch = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(batch, layout)
    for image, out in zip(batch, got):
        expected = TF.normalize(TF.to_tensor(image.permute(1, 2, 0).numpy()), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        assert torch.equal(out, expected)
    assert got.is_contiguous(memory_format=layout)
