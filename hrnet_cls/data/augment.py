"""timm's image augmentations (RandAugment, AugMix, AutoAugment, ColorJitter) on our uint8 training crops, in
the workers, each sample's randomness a function of (seed, epoch, sample) as its crop's is (docs/design.md §5.3)."""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import get_worker_info


def build_augment(auto_augment: str, color_jitter: float, img_size: int, mean: Sequence[float],
                  interpolation: str) -> Callable[[Image.Image], Image.Image] | None:
    """The PIL transform timm's create_transform(is_training=True) puts after its crop and flip, or None
    (ColorJitter is off under an auto_augment policy other than 3a, as in timm). Raises for a bad policy."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    from timm.data.transforms import str_to_pil_interp
    from torchvision import transforms

    steps = []
    if auto_augment:
        params = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in mean),
                      interpolation=str_to_pil_interp(interpolation))
        if auto_augment.startswith("rand"):
            steps.append(rand_augment_transform(auto_augment, params))
        elif auto_augment.startswith("augmix"):
            steps.append(augment_and_mix_transform(auto_augment, dict(params, translate_pct=0.3)))
        else:
            steps.append(auto_augment_transform(auto_augment, params))
    for op in _ops(steps):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    if color_jitter and (not auto_augment or "3a" in auto_augment):
        steps.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
    if not steps:
        return None
    composed = transforms.Compose(steps)
    composed.uses_torch = any(isinstance(t, transforms.ColorJitter) for t in steps)  # timm's ops draw from random, numpy
    return composed


def _ops(transforms: list) -> Iterator:
    """The AugmentOps of timm's RandAugment / AugMix (``ops``) and AutoAugment (``policy``: lists of ops)."""
    for t in transforms:
        yield from getattr(t, "ops", ())
        for sub in getattr(t, "policy", ()):
            yield from sub


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize as it ran on Pillow < 13: 0 bits kept is a black image. Pillow 13 raises for it, which
    "inc1" policies reach at magnitude 10 (rand-m9-mstd0.5 draws it; docs/design.md §4.12)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


@contextlib.contextmanager
def seeded(seed: int, torch_too: bool = True) -> Iterator[None]:
    """Python's and numpy's (and with ``torch_too`` torch's CPU) global RNGs seeded for one sample: timm's ops
    draw from the first two, torchvision's ColorJitter from torch's. In the main process (workers 0) they are
    put back after, so its own streams (random erasing, mixup, dropout) do not see the draws; a worker's
    own streams serve nothing else."""
    main = get_worker_info() is None
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state() if torch_too else None) if main else None
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if torch_too:
        torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            if saved[2] is not None:
                torch.set_rng_state(saved[2])


def augment_crop(crop: torch.Tensor, transform: Callable[[Image.Image], Image.Image], seed: int) -> torch.Tensor:
    """(3, S, S) uint8 -> the same after ``transform`` (PIL), drawn from ``seed``."""
    with seeded(seed, torch_too=getattr(transform, "uses_torch", True)):
        out = transform(Image.fromarray(crop.permute(1, 2, 0).numpy()))
    return torch.from_numpy(np.asarray(out.convert("RGB")).copy()).permute(2, 0, 1)
