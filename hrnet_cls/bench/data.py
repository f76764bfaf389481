"""Input pipeline speed: hrnet_cls.data against timm's wds reader + create_transform.

    python -m hrnet_cls.bench data                          # per core: 0 workers, in-process
    python -m hrnet_cls.bench data --workers 2 --out data_bench.json
    python -m hrnet_cls.bench data --size 1000x750          # large photos: JPEG draft decoding

Writes ``--images`` synthetic photo-like JPEGs (smooth colour fields + texture + grain,
quality 90; about 108 KB at 500x375, like an average ImageNet file) as an ImageFolder in a
temporary directory, shards them with hrnet_cls.shards, then runs each pipeline over the
same shards with the same number of DataLoader workers and one torch thread:

- train:  ours = build_train_loader (RandomResizedCrop 224 + flip + normalise);
          timm = ReaderWds + create_transform(224, is_training=True), whose default adds
          ColorJitter(0.4); timm-nojitter = the same with color_jitter=None (our augmentation).
- eval:   ours = build_val_loader (resize 256, centre crop 224); timm = ReaderWds +
          create_transform(224, is_training=False).

Passes are interleaved (ours, timm, ... then again) so machine drift hits all alike; each
figure is the median of ``--repeats`` full passes, start-up included. images/s per worker =
images / seconds / max(1, workers).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import PIL
import timm
import torch
from PIL import Image

from hrnet_cls.data import build_train_loader, build_val_loader
from hrnet_cls.shards import write_split

logger = logging.getLogger(__name__)
Pipeline = Callable[[int], Iterable]  # repeat index -> iterable of (images, targets, ...)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrnet_cls.bench data", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=384, help="synthetic JPEGs to shard")
    p.add_argument("--size", default="500x375", help="image WIDTHxHEIGHT, pixels")
    p.add_argument("--batch", type=int, default=32, help="images per batch")
    p.add_argument("--img-size", type=int, default=224, help="output crop side, pixels")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for every pipeline (0 = in-process)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline")
    p.add_argument("--no-eval", action="store_true", help="time the training pipelines only")
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG with photo-like statistics: smooth colour regions, edges, texture and noise."""
    coarse = rng.integers(0, 256, (height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(2, 8)  # texture orientation, pixels
    texture = 40 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) / period)
    # grain tuned so 500x375 files average ~108 KB, near ImageNet's mean file size
    noise = rng.normal(0, 24, (height, width, 1)) + rng.normal(0, 4, (height, width, 3))
    pixels = np.clip(base + texture[..., None] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, count: int, width: int, height: int) -> tuple[Path, float]:
    """(shard folder, mean JPEG size in bytes) for ``count`` images in 8 classes."""
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(count):
        folder = root / "src" / f"class{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        data = photo_like(rng, width, height)
        (folder / f"img{i:05d}.jpg").write_bytes(data)
        sizes.append(len(data))
    out = root / "shards"
    write_split(root / "src", out, "train", max_per_shard=64, workers=os.cpu_count() or 1, progress=False)
    return out, float(np.mean(sizes))


def timm_pipeline(shards: Path, args: argparse.Namespace, training: bool, **transform_kw) -> Pipeline:
    from timm.data import create_dataset, create_transform

    def run(repeat: int) -> Iterable:
        dataset = create_dataset("wds/bench", root=str(shards), split="train", is_training=training,
                                 batch_size=args.batch, seed=repeat)
        dataset.transform = create_transform(args.img_size, is_training=training, **transform_kw)
        dataset.set_loader_cfg(num_workers=args.workers)
        return torch.utils.data.DataLoader(dataset, batch_size=args.batch, num_workers=args.workers)
    return run


def pipelines(shards: Path, args: argparse.Namespace) -> dict[str, Pipeline]:
    urls = str(shards / "train-*.tar")
    found = {
        "train ours": lambda r: build_train_loader(urls, batch_size=args.batch, img_size=args.img_size, seed=0,
                                                   epoch=r, workers=args.workers),
        "train timm": timm_pipeline(shards, args, True),
        "train timm-nojitter": timm_pipeline(shards, args, True, color_jitter=None),
    }
    if not args.no_eval:
        found["eval ours"] = lambda r: build_val_loader(urls, batch_size=args.batch, img_size=args.img_size,
                                                        crop_pct=0.875, workers=args.workers)
        found["eval timm"] = timm_pipeline(shards, args, False, crop_pct=0.875)
    return found


def time_pass(make: Pipeline, repeat: int) -> tuple[int, float]:
    """(images, seconds) for one full pass, start-up included."""
    start, images = time.perf_counter(), 0
    for batch in make(repeat):
        images += batch[0].shape[0]
    return images, time.perf_counter() - start


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
            "timm": timm.__version__, "pillow": PIL.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def summarise(runs: dict[str, list[tuple[int, float]]], workers: int) -> dict[str, dict]:
    rows = {}
    for name, passes in runs.items():
        rates = [n / s for n, s in passes]
        rate = statistics.median(rates)
        rows[name] = {"images": passes[0][0], "img_per_s": rate, "img_per_s_per_worker": rate / max(1, workers),
                      "all_img_per_s": rates}
    for name, row in rows.items():
        kind, who = name.split()
        for base in ("timm", "timm-nojitter"):
            if who == "ours" and f"{kind} {base}" in rows:
                row[f"x_vs_{base}"] = row["img_per_s"] / rows[f"{kind} {base}"]["img_per_s"]
    return rows


def print_table(rows: dict[str, dict], args: argparse.Namespace, mean_kb: float) -> None:
    print(f"\n{args.images} JPEGs {args.size} (mean {mean_kb:.0f} KB) -> {args.img_size} px, batch {args.batch}, "
          f"workers {args.workers}, median of {args.repeats} passes")
    print(f"{'pipeline':<22}{'img/s':>9}{'img/s/worker':>14}{'vs timm':>10}{'vs timm-nojitter':>18}")
    for name, row in rows.items():
        ratios = [row.get("x_vs_timm"), row.get("x_vs_timm-nojitter")]
        cells = [f"{r:.2f}x" if r else "" for r in ratios]
        print(f"{name:<22}{row['img_per_s']:>9.1f}{row['img_per_s_per_worker']:>14.1f}{cells[0]:>10}{cells[1]:>18}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # per-core figures; DataLoader workers use one thread anyway
    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        shards, mean_bytes = make_shards(Path(tmp), args.images, width, height)
        runs: dict[str, list[tuple[int, float]]] = {}
        for repeat in range(args.repeats):
            for name, make in pipelines(shards, args).items():
                runs.setdefault(name, []).append(time_pass(make, repeat))
    rows = summarise(runs, args.workers)
    print_table(rows, args, mean_bytes / 1024)
    if args.out:
        result = {"machine": machine(), "settings": vars(args), "mean_jpeg_bytes": mean_bytes, "results": rows}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
