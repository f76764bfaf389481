"""The synthetic shards (sections 4-6), and section 5: can the input pipeline feed the train step?

Shards: ``images`` ImageNet-sized JPEGs (bench/data.py's photo_like: 500x375, ~110 KB,
quality 90) in 8 classes, of which ``unique_images`` are distinct (generated on every core;
the rest repeat them, which costs a decoder the same), sharded by hrnet_cls.shards as
bench/data.py's make_shards does (64 per shard). Written once, before the first section.

Section 5: our training loader (build_train_loader: RandomResizedCrop 224, flip, normalise)
with a worker on every core, two epochs, images/s against the train step's demand
(section 1's ours compiled w18 images/s); then torchvision.io.decode_jpeg on a list of
encoded images with device=cuda (nvJPEG, batched), alone and followed by a random resized
crop to 224 on the GPU (F.interpolate, bilinear, antialias), flip and normalisation.
"""
from __future__ import annotations

import multiprocessing
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

from hrnet_cls.bench.data import photo_like
from hrnet_cls.bench.gpu.common import Context, run_rows
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_train_loader
from hrnet_cls.shards import write_split
from hrnet_cls.timing import synchronize

WIDTH, HEIGHT, CLASSES, PER_SHARD = 500, 375, 8, 64
ROWS = ("cpu_loader", "train_demand", "gpu_decode", "gpu_decode_crop_resize")


@dataclass
class Shards:
    root: Path  # the folder of train-NNNNNN.tar and _info.json
    pattern: str  # a glob naming them (hrnet_cls.data.expand_urls reads it)
    images: int
    jpegs: list[bytes]  # the distinct encoded images, for the GPU decoder
    mean_bytes: float
    seconds: float

    def brace(self) -> str:
        """The shards as a brace range, as a recipe's data.train_shards names them."""
        last = len(list(self.root.glob("train-*.tar"))) - 1
        return str(self.root / f"train-{{000000..{last:06d}}}.tar")


def _photo(seed: int) -> bytes:
    return photo_like(np.random.default_rng(seed), WIDTH, HEIGHT)


def write_shards(root: Path, images: int, unique: int, workers: int) -> Shards:
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        jpegs = pool.map(_photo, range(unique))
    src = root / "src"
    for i in range(images):
        folder = src / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:05d}.jpg").write_bytes(jpegs[i % unique])
    out = root / "shards"
    write_split(src, out, "train", max_per_shard=PER_SHARD, workers=workers, progress=False)
    shutil.rmtree(src)
    return Shards(out, str(out / "train-*.tar"), images, jpegs,
                  float(np.mean([len(jpegs[i % unique]) for i in range(images)])), time.perf_counter() - start)


def loader_rate(ctx: Context) -> dict:
    """Our training loader over the shards, every core decoding: two epochs, start-up included."""
    epochs = []
    for epoch in range(2):
        loader = build_train_loader(ctx.shards.pattern, batch_size=ctx.p.loader_batch, img_size=ctx.p.img_size,
                                    seed=0, epoch=epoch, workers=ctx.workers, pin_memory=ctx.cuda)
        start, first, seen, after_first = time.perf_counter(), None, 0, 0
        for images, *_ in loader:
            if first is None:
                first = time.perf_counter()
            else:
                after_first += images.shape[0]
            seen += images.shape[0]
        end = time.perf_counter()
        epochs.append({"images": seen, "seconds": end - start, "images_per_s": seen / (end - start),
                       "startup_s": first - start,
                       "steady_images_per_s": after_first / (end - first) if end > first else None})
    return {"workers": ctx.workers, "batch": ctx.p.loader_batch, "img_size": ctx.p.img_size, "epochs": epochs,
            "images_per_s": statistics.median(e["images_per_s"] for e in epochs),
            "steady_images_per_s": epochs[-1]["steady_images_per_s"]}


def demand(ctx: Context) -> dict:
    """What the train step consumes: section 1's ours compiled w18 (else eager) images/s."""
    rows = ctx.results.get("train_step", {}).get("rows", {})
    for key in ("ours_w18_compile", "ours_w18_eager"):
        if rows.get(key, {}).get("images_per_s"):
            return {"source": f"section 1 {key}", "model": rows[key]["model"],
                    "images_per_s": rows[key]["images_per_s"]}
    raise RuntimeError("no train-step images/s: section 1's w18 rows did not run (--sections)")


def crop_resize(images: list[torch.Tensor], size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop(size) + horizontal flip + normalise of decoded uint8 (3, H, W) images, on their device."""
    out = torch.empty(len(images), 3, size, size, device=images[0].device)
    for i, image in enumerate(images):
        top, left, height, width = RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        crop = image[None, :, top:top + height, left:left + width].float()
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    flip = torch.rand(len(images), device=out.device) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return ((out / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


def device_decode(ctx: Context, crop: bool) -> dict:
    """decode_jpeg(list of encoded images, device=...) batched; median of decode_iters batches."""
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in ctx.shards.jpegs]
    size, n = ctx.p.img_size, ctx.p.decode_batch
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=ctx.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=ctx.device).view(1, 3, 1, 1)
    times = []
    for k in range(ctx.p.warmup + ctx.p.decode_iters):  # batches rotate through the distinct images
        batch = [encoded[(k * n + j) % len(encoded)] for j in range(n)]
        synchronize(ctx.device)
        start = time.perf_counter()
        images = decode_jpeg(batch, mode=ImageReadMode.RGB, device=ctx.device)
        if crop:
            images = crop_resize(images, size, mean, std)
        synchronize(ctx.device)
        times.append(time.perf_counter() - start)
    batch_s = statistics.median(times[ctx.p.warmup:])
    return {"device": str(ctx.device), "batch": n, "output": f"{size}x{size} float NHWC normalised" if crop
            else f"uint8 {WIDTH}x{HEIGHT}", "batch_s": batch_s, "images_per_s": n / batch_s}


def input_pipeline_section(ctx: Context, out: dict) -> None:
    out["settings"] = {"images": ctx.shards.images, "jpeg": f"{WIDTH}x{HEIGHT}",
                       "mean_jpeg_kb": ctx.shards.mean_bytes / 1024, "workers": ctx.workers}
    rows = out["rows"] = {key: {"error": "not run"} for key in ROWS}
    run_rows(ctx, rows, ("train_demand",), lambda: {"train_demand": demand(ctx)})
    run_rows(ctx, rows, ("cpu_loader",), lambda: {"cpu_loader": loader_rate(ctx)})
    run_rows(ctx, rows, ("gpu_decode",), lambda: {"gpu_decode": device_decode(ctx, crop=False)})
    run_rows(ctx, rows, ("gpu_decode_crop_resize",),
             lambda: {"gpu_decode_crop_resize": device_decode(ctx, crop=True)})
    need = rows["train_demand"].get("images_per_s")
    for key in ("cpu_loader", "gpu_decode", "gpu_decode_crop_resize"):
        if need and rows[key].get("images_per_s"):
            rows[key]["vs_demand"] = rows[key]["images_per_s"] / need
