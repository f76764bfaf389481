"""Input pipeline speed: hrnet_cls.data against timm's wds reader + create_transform, and the decode ceiling.

    python -m benchmarks data                                     # per core: workers 0, one thread
    python -m benchmarks data --workers 2 --size 1000x750 --out results
    python -m benchmarks data --device cuda --workers 16 --pipelines "train ours" --no-ceiling --decode-batch 256

Synthetic photo-like JPEGs (~108 KB at 500x375, an average ImageNet file) or --data shards. Pipelines:
train ours (uint8 batches, normalised later on the device), ours-float (normalised on the CPU in the loop, as
the loaders did before and as timm's do), ours-pil (PIL decodes: the same pixels), timm (its default adds
ColorJitter 0.4), timm-nojitter (our augmentation), ours-ra and timm-ra (RandAugment rand-m9-mstd0.5 in both; timm's also
erases 0.25 of the images on the CPU, ours does that on the device), eval ours, ours-float and timm. The decode ceiling (one thread, the boxes train
ours draws): decode only by PIL, torchvision and simplejpeg, and train ours per worker as a fraction
of each. --decode-batch N: decode_jpeg on --device over batches of N (nvJPEG on CUDA).
"""
import argparse
import io
import itertools
import multiprocessing
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from hrnet_cls.data import build_train_loader, build_val_loader, expand_urls, transforms
from hrnet_cls.data.transforms import (draft, draft_factor, random_resized_crop_box, sample_rng, turbo_decode,
                                       turbo_header)
from hrnet_cls.data.workers import usable_cores
from hrnet_cls.shards import write_split

from benchmarks import harness

SMOKE = dict(images=16, unique=8, size="96x72", batch=4, img_size=32, decode_batch=4)
PIPELINES = ("train ours", "train ours-float", "train ours-pil", "train timm", "train timm-nojitter", "train ours-ra",
             "train timm-ra", "eval ours", "eval ours-float", "eval timm")
# the -ra rows: RandAugment (+ timm's random erasing 0.25, which ours runs on the device); not "-inc1", whose posterize
# crashes timm's own pipeline on Pillow 13 (docs/design.md §4.12)
AUGMENT = "rand-m9-mstd0.5"


def options() -> argparse.ArgumentParser:
    p = harness.parser("data", __doc__, threads=1)
    p.add_argument("--data", default="", help="shards to read (default: write synthetic ones)")
    p.add_argument("--images", type=int, default=384, help="synthetic JPEGs to write")
    p.add_argument("--unique", type=int, default=0, help="distinct ones among them (0 = all)")
    p.add_argument("--size", default="500x375", help="synthetic image WIDTHxHEIGHT, pixels")
    p.add_argument("--batch", type=int, default=32, help="images per batch")
    p.add_argument("--img-size", type=int, default=224, help="output crop side, pixels")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of every pipeline (0 = in-process)")
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES, metavar="NAME")
    p.add_argument("--no-ceiling", action="store_true", help="leave out the decode ceiling")
    p.add_argument("--decode-batch", type=int, default=0, help="decode_jpeg on --device, this batch (0 = off)")
    return p


def photo_like(seed: int, width: int = 500, height: int = 375) -> bytes:
    """A JPEG with photo-like statistics: smooth colour regions, edges, texture and noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(2, 8)  # texture orientation, pixels
    texture = 40 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / period)
    # grain tuned so 500x375 files average ~108 KB, near ImageNet's mean file size
    noise = rng.normal(0, 24, (height, width, 1)) + rng.normal(0, 4, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + texture[..., None] + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Shards(NamedTuple):
    """Shards (a glob or brace pattern) of one folder and split, as timm's wds reader names them too."""

    pattern: str
    root: Path
    split: str

    @classmethod
    def of(cls, urls: str) -> "Shards":
        first = Path(expand_urls(urls)[0])
        return cls(urls, first.parent, first.name.rsplit("-", 1)[0])


def make_shards(root: Path, images: int, size: str = "500x375", unique: int = 0, workers: int = 1) -> Shards:
    """``images`` synthetic JPEGs in 8 classes, ``unique`` of them distinct, as train-*.tar (64 per shard)."""
    width, height = (int(v) for v in size.lower().split("x"))
    unique = min(unique or images, images)
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        jpegs = pool.starmap(photo_like, [(i, width, height) for i in range(unique)])
    for i in range(images):
        (root / "src" / f"class{i % 8}").mkdir(parents=True, exist_ok=True)
        (root / "src" / f"class{i % 8}" / f"img{i:05d}.jpg").write_bytes(jpegs[i % unique])
    write_split(root / "src", root / "shards", "train", max_per_shard=64, workers=workers, progress=False)
    shutil.rmtree(root / "src")
    return Shards.of(str(root / "shards" / "train-*.tar"))


def read_samples(shards: Shards) -> list[tuple[str, bytes]]:
    """(key, encoded image) of every sample, in tar order."""
    found = []
    for path in expand_urls(shards.pattern):
        with tarfile.open(path) as tar:
            found += [(m.name.split(".", 1)[0], tar.extractfile(m).read()) for m in tar
                      if m.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp")]
    return found


def pipelines(shards: Shards, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """name -> one full pass over the shards."""
    from timm.data import create_dataset, create_transform

    def timm_pass(training: bool, **kw: object) -> Callable[[], None]:
        def run() -> None:
            ds = create_dataset("wds/bench", root=str(shards.root), split=shards.split, is_training=training,
                                batch_size=args.batch)
            ds.transform = create_transform(args.img_size, is_training=training, **kw)
            ds.set_loader_cfg(num_workers=args.workers)
            for _ in torch.utils.data.DataLoader(ds, batch_size=args.batch, num_workers=args.workers):
                pass
        return run

    def ours(train: bool, pil: bool = False, normalised: bool = False, augment: str = "") -> Callable[[], None]:
        def run() -> None:  # pil: no simplejpeg, in the forked DataLoader workers too (they inherit it)
            with mock.patch.object(transforms, "simplejpeg", None if pil else transforms.simplejpeg):
                loader = (build_train_loader(shards.pattern, batch_size=args.batch, img_size=args.img_size, seed=0,
                                             epoch=0, workers=args.workers, pin_memory=args.device.startswith("cuda"),
                                             auto_augment=augment)
                          if train else build_val_loader(shards.pattern, batch_size=args.batch,
                                                         img_size=args.img_size, crop_pct=0.875, workers=args.workers))
                for images, *_ in loader:
                    if normalised:  # the float32 batch the loaders shipped before, made on the CPU
                        loader.normalize(images)
        return run
    every = {"train ours": ours(True), "train ours-float": ours(True, normalised=True),
             "train ours-pil": ours(True, pil=True), "train timm": timm_pass(True),
             "train timm-nojitter": timm_pass(True, color_jitter=None), "train ours-ra": ours(True, augment=AUGMENT),
             "train timm-ra": timm_pass(True, auto_augment=AUGMENT, re_prob=0.25), "eval ours": ours(False),
             "eval ours-float": ours(False, normalised=True), "eval timm": timm_pass(False, crop_pct=0.875)}
    if transforms.simplejpeg is None:
        del every["train ours-pil"]  # train ours is the PIL pipeline then
    return {name: fn for name, fn in every.items() if name in args.pipelines}


def plan_crops(samples: list[tuple[str, bytes]], img_size: int) -> list[tuple]:
    """(data, width, height, box, flip, keep) of each sample as train ours draws them (seed 0, epoch 0)."""
    planned = []
    for key, data in samples:
        rng = sample_rng(0, 0, key)
        width, height = turbo_header(data) or Image.open(io.BytesIO(data)).size
        box = random_resized_crop_box(width, height, rng)
        planned.append((data, width, height, box, rng.random() < 0.5, min(box[2], box[3]) / img_size))
    return planned


def pil_load(data: bytes, keep: float) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    draft(img, keep)
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def ceiling_passes(samples: list, args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """Decode-only passes over the samples, each decoded as train ours would (or at full size)."""
    plan = plan_crops(samples, args.img_size)
    passes = {"decode only, full (PIL)": lambda: [pil_load(d, 1.0) for d, *_ in plan],
              "decode only, draft as the pipeline (PIL)": lambda: [pil_load(d, k) for d, *_, k in plan],
              "decode only, full (torchvision)": lambda: [decode_jpeg(
                  torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB) for d, *_ in plan]}
    if transforms.simplejpeg is None:
        return passes
    factors = [draft_factor(w, h, k) for _, w, h, _, _, k in plan]
    return passes | {
        "decode only, full (simplejpeg)": lambda: [turbo_decode(d, w, h, 1) for d, w, h, *_ in plan],
        "decode only, draft as the pipeline (simplejpeg)": lambda: [
            turbo_decode(d, w, h, f) for (d, w, h, *_), f in zip(plan, factors)]}


def device_decode(jpegs: list[bytes], args: argparse.Namespace) -> dict:
    """decode_jpeg(a list of --decode-batch encoded images, device=--device): nvJPEG's batched decode on CUDA."""
    device, n = torch.device(args.device), args.decode_batch
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    batches = itertools.cycle([[encoded[(k * n + j) % len(encoded)] for j in range(n)] for k in range(4)])
    timed = harness.measure({"decode": lambda: decode_jpeg(next(batches), mode=ImageReadMode.RGB, device=device)}, args)
    return harness.timed_row(timed["decode"], n, device=str(device), batch=n, output="uint8, full size")


def pipeline_rows(shards: Shards, images: int, args: argparse.Namespace) -> dict[str, dict]:
    rows = {name: harness.timed_row(t, images, images=images, workers=args.workers)
            for name, t in harness.measure(pipelines(shards, args), args).items()}
    for name, row in rows.items():
        row["images_per_s_per_worker"] = harness.ratio(row.get("images_per_s"), max(1, args.workers))
        kind, who = name.split()
        for base in ("timm", "timm-nojitter", "ours-pil", "ours-float", "timm-ra"):
            if who.startswith("ours") and who != base and f"{kind} {base}" in rows and who.endswith("-ra") == \
                    base.endswith("-ra"):
                row[f"vs_{base}"] = harness.ratio(row.get("images_per_s"), rows[f"{kind} {base}"].get("images_per_s"))
    return rows


def ceiling_rows(samples: list, ours: dict, args: argparse.Namespace) -> dict[str, dict]:
    """Decode-only images/s, and train ours's images/s per worker as a fraction of each."""
    rows = {name: harness.timed_row(t, len(samples)) for name, t in
            harness.measure(ceiling_passes(samples, args), args).items()}
    for row in rows.values():
        row["fraction"] = harness.ratio(ours.get("images_per_s_per_worker"), row.get("images_per_s"))
    return rows


def run(args: argparse.Namespace, report: harness.Report) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        shards = Shards.of(args.data) if args.data else make_shards(Path(tmp), args.images, args.size, args.unique,
                                                                    usable_cores())
        samples = read_samples(shards)
        kb = np.mean([len(d) for _, d in samples]) / 1024
        rows = report.section("pipelines", f"Pipelines: {len(samples)} JPEGs (mean {kb:.0f} KB) -> {args.img_size} "
                              f"px, batch {args.batch}, workers {args.workers}", shards=shards.pattern)
        report.row(rows, "pipelines", lambda: pipeline_rows(shards, len(samples), args), many=True)
        if not args.no_ceiling:
            ceiling = report.section("ceiling", "Decode ceiling: one thread, the files and boxes train ours draws",
                                     fraction="train ours images/s per worker / decode-only images/s")
            report.row(ceiling, "ceiling", lambda: ceiling_rows(samples, rows.get("train ours", {}), args), many=True)
        if args.decode_batch:
            gpu = report.section("device_decode", f"decode_jpeg on {args.device}, batch {args.decode_batch}")
            jpegs = list(dict.fromkeys(d for _, d in samples))[:4 * args.decode_batch]  # distinct ones, as in a pass
            report.row(gpu, "decode", lambda: device_decode(jpegs, args))


def main(argv: list[str]) -> int:
    return harness.cli("data", options(), run, argv, SMOKE)
