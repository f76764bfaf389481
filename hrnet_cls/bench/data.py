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

- train ours-pil: build_train_loader with simplejpeg switched off, every image decoded by
          PIL as before simplejpeg was adopted (the same pixels; the adoption's gain).

The decode ceiling (in-process, one thread, leave out with ``--no-ceiling``), over the same
files with the boxes ``train ours`` draws in that pass (the same sample_rng(seed, epoch,
key), random_resized_crop_box and draft rule, transforms.draft_factor):

- decode only, full: ``Image.open(...).load()`` (+ convert("RGB") where not RGB), PIL's
  libjpeg-turbo at full scale, pixels left in PIL's memory;
- decode only, draft as the pipeline: the same after transforms.draft(img, keep), the
  Image.draft call train_crop_pil makes for that sample's box (no reduction at 500x375:
  a 224 px box is never 2x the output there);
- the same two through simplejpeg (transforms.turbo_decode), the decoder train ours uses;
- torchvision.io.decode_jpeg on the CPU, full size (it has no reduced-scale decode);
- train ours as a fraction of each: pipeline images/s per worker / decode-only images/s,
  per round, median and range over the rounds;
- where the time goes: one more pass of each training pipeline, run stage by stage as
  _decode_train_batch runs it, with time.perf_counter around the stages: read (tar reading,
  shuffle buffer, chunking), batch (allocating the batch, targets, positions), header +
  box (sample_rng, the JPEG header, the box and flip draws), decode, to numpy (PIL only:
  the copy out of PIL's memory), crop + resize (region copy, antialiased interpolate,
  flip), normalise (into the batch slot); "outside" = the timed pipeline's seconds per
  image minus the stages' sum (DataLoader, ordering, bookkeeping; noise can make it < 0).

Passes are interleaved (ours, timm, ..., the ceiling passes, then again) so machine drift
hits all alike; each figure is the median of ``--repeats`` full passes, start-up included.
images/s per worker = images / seconds / max(1, workers).
"""
from __future__ import annotations

import argparse
import contextlib
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
from typing import Callable, Iterable, Iterator

import numpy as np
import PIL
import PIL.features
import timm
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from hrnet_cls.data import build_train_loader, build_val_loader, expand_urls, shard_lengths, transforms
from hrnet_cls.data.sources import Segment, SkipCounter, chunks, read_segment, shuffle_buffer
from hrnet_cls.data.train_loader import _slot_stream
from hrnet_cls.data.transforms import (Normalizer, crop_resize, draft, draft_factor, random_resized_crop_box,
                                       sample_rng, turbo_decode, turbo_header)
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
    p.add_argument("--no-ceiling", action="store_true", help="leave out the decode ceiling and the stage times")
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


@contextlib.contextmanager
def pil_decoding() -> Iterator[None]:
    """train_crop with simplejpeg switched off (forked DataLoader workers inherit it)."""
    saved, transforms.simplejpeg = transforms.simplejpeg, None
    try:
        yield
    finally:
        transforms.simplejpeg = saved


def pil_only(make: Pipeline) -> Pipeline:
    def run(repeat: int) -> Iterator:
        with pil_decoding():
            yield from make(repeat)
    return run


def pipelines(shards: Path, args: argparse.Namespace) -> dict[str, Pipeline]:
    urls = str(shards / "train-*.tar")
    ours = lambda r: build_train_loader(urls, batch_size=args.batch, img_size=args.img_size, seed=0,  # noqa: E731
                                        epoch=r, workers=args.workers)
    found = {"train ours": ours}
    if transforms.simplejpeg is not None:
        found["train ours-pil"] = pil_only(ours)
    found.update({
        "train timm": timm_pipeline(shards, args, True),
        "train timm-nojitter": timm_pipeline(shards, args, True, color_jitter=None),
    })
    if not args.no_eval:
        found["eval ours"] = lambda r: build_val_loader(urls, batch_size=args.batch, img_size=args.img_size,
                                                        crop_pct=0.875, workers=args.workers)
        found["eval timm"] = timm_pipeline(shards, args, False, crop_pct=0.875)
    return found


# ---------------------------------------------------------------- the decode ceiling

Planned = tuple[bytes, int, int, tuple[int, int, int, int], bool, float]  # data, width, height, box, flip, keep


def read_samples(urls: str) -> list[tuple[str, bytes]]:
    """(key, encoded image) of every sample in the shards, in tar order."""
    found = []
    for url, length in zip(expand_urls(urls), shard_lengths(expand_urls(urls))):
        found += [(key, data) for key, data, _, _ in read_segment(Segment(url, 0, length), None, SkipCounter())]
    return found


def plan_crops(samples: list[tuple[str, bytes]], args: argparse.Namespace, epoch: int) -> list[Planned]:
    """Each sample's box, flip and keep as train ours draws them in epoch ``epoch`` (seed 0)."""
    planned = []
    for key, data in samples:
        rng = sample_rng(0, epoch, key)
        width, height = Image.open(io.BytesIO(data)).size
        box = random_resized_crop_box(width, height, rng)
        flip = rng.random() < 0.5
        planned.append((data, width, height, box, flip, min(box[2], box[3]) / args.img_size))
    return planned


def _pil_load(data: bytes, keep: float) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    draft(img, keep)
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_passes() -> dict[str, Callable[[list[Planned]], None]]:
    """Decode-only passes over planned crops: name -> run."""
    found = {
        "decode only, full (PIL)": lambda plan: [_pil_load(d, 1.0) for d, *_ in plan],
        "decode only, draft as the pipeline (PIL)": lambda plan: [_pil_load(d, k) for d, _, _, _, _, k in plan],
    }
    # torchvision's CPU decoder (libjpeg-turbo too): full size only, it has no reduced-scale decode
    found["decode only, full (torchvision)"] = lambda plan: [
        decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB) for d, *_ in plan]
    if transforms.simplejpeg is not None:
        found["decode only, full (simplejpeg)"] = lambda plan: [turbo_decode(d, w, h, 1) for d, w, h, *_ in plan]
        found["decode only, draft as the pipeline (simplejpeg)"] = lambda plan: [
            turbo_decode(d, w, h, draft_factor(w, h, k)) for d, w, h, _, _, k in plan]
    return found


STAGES = ("read", "batch", "header + box", "decode", "to numpy", "crop + resize", "normalise")


def staged_pass(urls: str, args: argparse.Namespace, epoch: int, pil: bool) -> tuple[dict[str, float], list]:
    """(seconds per stage, batches) for one pass of train ours (workers 0) run stage by stage:
    _slot_stream + shuffle_buffer + chunks, then _decode_train_batch's work per sample, with
    train_crop (pil=False) or train_crop_pil (pil=True) taken apart into its stages."""
    plan = build_train_loader(urls, batch_size=args.batch, img_size=args.img_size, seed=0, epoch=epoch,
                              workers=0).plan
    spent = dict.fromkeys(STAGES, 0.0)
    stream = iter(chunks(shuffle_buffer(_slot_stream(plan, 0, SkipCounter()), plan.buffer,
                                        sample_rng(plan.seed, plan.epoch, plan.rank, 0, "buffer")), plan.batch_size))
    normalize, batches, clock = Normalizer(plan.mean, plan.std), [], time.perf_counter
    while True:
        t0 = clock()
        chunk = next(stream, None)
        t1 = clock()
        spent["read"] += t1 - t0
        if chunk is None:
            return spent, batches
        images = torch.empty(len(chunk), 3, plan.img_size, plan.img_size)
        targets = torch.tensor([raw[2] for raw in chunk], dtype=torch.int64)
        positions = np.array([raw[3] for raw in chunk], dtype=np.int64)
        spent["batch"] += clock() - t1
        for i, (key, data, _, _) in enumerate(chunk):
            t0 = clock()
            rng = sample_rng(plan.seed, plan.epoch, key)
            if pil:
                img = Image.open(io.BytesIO(data))
                size = img.size
            else:
                size = turbo_header(data)
                if size is None:
                    raise ValueError(f"sample {key}: not a JPEG simplejpeg decodes; the stage times assume one")
            box = random_resized_crop_box(*size, rng, plan.scale, plan.ratio)
            flip = rng.random() < plan.hflip
            keep = min(box[2], box[3]) / plan.img_size
            t1 = clock()
            if pil:
                factor = draft(img, keep)
                img.load()
                t2 = clock()
                pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
            else:
                factor = draft_factor(*size, keep)
                pixels = turbo_decode(data, *size, factor)
                t2 = clock()
            t3 = clock()
            out = crop_resize(pixels, factor, box, flip, plan.img_size, plan.interpolation)
            t4 = clock()
            normalize(out, images[i])
            t5 = clock()
            for stage, dt in zip(STAGES[2:], (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                spent[stage] += dt
        batches.append((images, targets, positions))


def ceiling_round(urls: str, samples: list[tuple[str, bytes]], args: argparse.Namespace,
                  repeat: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(decode-only images/s by name, stage seconds per image by pipeline) for one round."""
    plan = plan_crops(samples, args, repeat)
    rates = {}
    for name, run in decode_passes().items():
        start = time.perf_counter()
        run(plan)
        rates[name] = len(plan) / (time.perf_counter() - start)
    stages = {}
    for name, pil in (("train ours", False), ("train ours-pil", True)):
        if name == "train ours" and transforms.simplejpeg is None:
            pil = True  # without simplejpeg train ours is the PIL pipeline
        elif name == "train ours-pil" and transforms.simplejpeg is None:
            continue
        spent, batches = staged_pass(urls, args, repeat, pil)
        images = sum(b[0].shape[0] for b in batches)
        stages[name] = {stage: seconds / images for stage, seconds in spent.items()}
    return rates, stages


def summarise_ceiling(rates: list[dict[str, float]], stages: list[dict[str, dict[str, float]]],
                      runs: dict[str, list[tuple[int, float]]], workers: int) -> dict:
    """Medians and ranges of the decode-only rates, train ours's fraction of each (per round),
    and the median seconds per image of each stage."""
    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}

    per_worker = {name: [n / s / max(1, workers) for n, s in passes] for name, passes in runs.items()}
    result: dict = {"decode": {name: spread([r[name] for r in rates]) for name in rates[0]}, "fraction": {},
                    "stages": {}}
    for pipeline in ("train ours", "train ours-pil"):
        if pipeline not in per_worker:
            continue
        for name in rates[0]:
            result["fraction"][f"{pipeline} / {name}"] = spread(
                [p / r[name] for p, r in zip(per_worker[pipeline], rates)])
        if pipeline in stages[0]:
            ms = {stage: 1e3 * statistics.median(s[pipeline][stage] for s in stages) for stage in STAGES}
            total_ms = 1e3 * statistics.median(s / n for n, s in runs[pipeline])
            ms["outside"] = total_ms - sum(ms.values())
            result["stages"][pipeline] = {"ms_per_image": ms, "pipeline_ms_per_image": total_ms,
                                          "share": {k: v / total_ms for k, v in ms.items()}}
    return result


def print_ceiling(ceiling: dict, rounds: int) -> None:
    print(f"\ndecode ceiling, one thread, the same files and boxes as train ours, median [range] of {rounds} rounds")
    for name, row in ceiling["decode"].items():
        print(f"{name:<52}{row['median']:>9.1f} img/s  [{row['min']:.0f}-{row['max']:.0f}]")
    for name, row in ceiling["fraction"].items():
        print(f"{name:<74}{row['median']:>6.2f}  [{row['min']:.2f}-{row['max']:.2f}]")
    for pipeline, row in ceiling["stages"].items():
        print(f"\nwhere {pipeline} spends its {row['pipeline_ms_per_image']:.3f} ms per image (median of {rounds})")
        for stage, ms in row["ms_per_image"].items():
            if stage == "to numpy" and ms == 0.0:
                continue
            print(f"  {stage:<16}{ms:>8.3f} ms  {100 * row['share'][stage]:>5.1f}%")


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
            "libjpeg_turbo": PIL.features.version_feature("libjpeg_turbo"),
            "simplejpeg": getattr(transforms.simplejpeg, "__version__", None),
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
        for base in ("timm", "timm-nojitter", "ours-pil"):
            if who.startswith("ours") and who != base and f"{kind} {base}" in rows:
                row[f"x_vs_{base}"] = row["img_per_s"] / rows[f"{kind} {base}"]["img_per_s"]
    return rows


def print_table(rows: dict[str, dict], args: argparse.Namespace, mean_kb: float) -> None:
    print(f"\n{args.images} JPEGs {args.size} (mean {mean_kb:.0f} KB) -> {args.img_size} px, batch {args.batch}, "
          f"workers {args.workers}, median of {args.repeats} passes")
    print(f"{'pipeline':<22}{'img/s':>9}{'img/s/worker':>14}{'vs timm':>10}{'vs timm-nojitter':>18}"
          f"{'vs ours-pil':>13}  range img/s")
    for name, row in rows.items():
        ratios = [row.get("x_vs_timm"), row.get("x_vs_timm-nojitter"), row.get("x_vs_ours-pil")]
        cells = [f"{r:.2f}x" if r else "" for r in ratios]
        span = f"{min(row['all_img_per_s']):.0f}-{max(row['all_img_per_s']):.0f}"
        print(f"{name:<22}{row['img_per_s']:>9.1f}{row['img_per_s_per_worker']:>14.1f}{cells[0]:>10}{cells[1]:>18}"
              f"{cells[2]:>13}  {span}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # per-core figures; DataLoader workers use one thread anyway
    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        shards, mean_bytes = make_shards(Path(tmp), args.images, width, height)
        urls = str(shards / "train-*.tar")
        samples = [] if args.no_ceiling else read_samples(urls)
        runs: dict[str, list[tuple[int, float]]] = {}
        rates, stages = [], []
        for repeat in range(args.repeats):
            for name, make in pipelines(shards, args).items():
                runs.setdefault(name, []).append(time_pass(make, repeat))
            if not args.no_ceiling:
                round_rates, round_stages = ceiling_round(urls, samples, args, repeat)
                rates.append(round_rates)
                stages.append(round_stages)
    rows = summarise(runs, args.workers)
    print_table(rows, args, mean_bytes / 1024)
    ceiling = None if args.no_ceiling else summarise_ceiling(rates, stages, runs, args.workers)
    if ceiling:
        print_ceiling(ceiling, args.repeats)
    if args.out:
        result = {"machine": machine(), "settings": vars(args), "mean_jpeg_bytes": mean_bytes, "results": rows,
                  "ceiling": ceiling}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
