"""Validation sweep against separate runs: N checkpoints in one pass vs one pass each.

    python -m hrnet_cls.bench val                                  # synthetic ImageNet-sized JPEGs, 224 px
    python -m hrnet_cls.bench val --data 'shards/digits/val-*.tar' --img-size 32
    python -m hrnet_cls.bench val --model hrnet_w18_small_c --images 128 --out val_bench.json

Saves ``--checkpoints`` random-init training checkpoints of ``--model`` (weights do not
change the cost), takes ``--data`` shards or writes ``--images`` synthetic photo-like JPEGs
(as ``bench data``: 500x375, ~108 KB, like an average ImageNet file), then times, in one
process with one torch thread (per-core figures), each call sequence that validate.py makes:

- sweep:    describe_all + build_rows + run_sweep over all checkpoints: one loader pass,
            each batch decoded once and fed to every model;
- separate: the same calls once per checkpoint: one pass each, every sample decoded N times;
- decode only: one loader pass feeding no model, the decoding cost by itself.

Runs are interleaved (sweep, separate, sweep, ...) so machine drift hits both alike; each
figure is the median of ``--repeats`` runs, model loading included. ratio = separate / sweep
seconds. Top-1 of every checkpoint is checked to be the same both ways. With decoding d and
model time m per pass, ratio = N (d + m) / (d + N m): near N where decoding dominates (a
GPU), near 1 where the models do (a CPU with larger models or inputs).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

from hrnet_cls.bench.data import machine, make_shards
from hrnet_cls.checkpoint import build_state, save_checkpoint
from hrnet_cls.data import build_val_loader, expand_urls, read_info
from hrnet_cls.distributed import DistInfo
from hrnet_cls.validation import (
    Row,
    SweepSettings,
    build_rows,
    checkpoint_specs,
    describe_all,
    expected_samples,
    run_sweep,
)

logger = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrnet_cls.bench val", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="", help="val shards to use (default: write synthetic ones)")
    p.add_argument("--images", type=int, default=256, help="synthetic JPEGs to write when no --data")
    p.add_argument("--size", default="500x375", help="synthetic image WIDTHxHEIGHT, pixels")
    p.add_argument("--model", default="hrnet_tiny_c", help="timm model of the checkpoints")
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints in the sweep")
    p.add_argument("--img-size", type=int, default=224, help="evaluation crop side, pixels")
    p.add_argument("--crop-pct", type=float, default=0.875, help="centre-crop fraction")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = decode in-process)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each way")
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def make_checkpoints(folder: Path, args: argparse.Namespace, num_classes: int) -> list[str]:
    """``--checkpoints`` training checkpoints of random-init models, seeds 0, 1, ..."""
    config = {"model": {"name": args.model, "num_classes": num_classes},
              "data": {"img_size": args.img_size, "crop_pct": args.crop_pct}}
    paths = []
    for seed in range(args.checkpoints):
        torch.manual_seed(seed)
        model = timm.create_model(args.model, num_classes=num_classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        paths.append(str(folder / f"ckpt_{seed}.pth"))
        save_checkpoint(paths[-1], build_state(model=model, optimizer=optimizer, epoch=1, step=1,
                                               batch_in_epoch=0, config=config))
    return paths


def validate_once(paths: list[str], settings: SweepSettings) -> tuple[float, int, list[Row]]:
    """(seconds, loader passes, rows) of one validate.py-style call sequence over ``paths``."""
    start = time.perf_counter()
    rows = build_rows(describe_all(checkpoint_specs(paths)))
    passes = run_sweep(rows, settings, DistInfo(0, 0, 1, torch.device("cpu"), True))
    seconds = time.perf_counter() - start
    failed = [row.error for row in rows if row.error]
    if failed:
        raise RuntimeError(f"benchmark rows failed: {failed}")
    return seconds, len(passes), rows


def decode_seconds(settings: SweepSettings, args: argparse.Namespace) -> float:
    """Seconds of one loader pass that feeds no model: the decoding cost alone."""
    start = time.perf_counter()
    for _ in build_val_loader(list(settings.shards), batch_size=args.batch_size, img_size=args.img_size,
                              crop_pct=args.crop_pct, workers=args.workers):
        pass
    return time.perf_counter() - start


def time_both(paths: list[str], settings: SweepSettings, args: argparse.Namespace) -> dict[str, dict]:
    """Interleaved runs of the sweep, the separate calls and a bare loader pass; medians."""
    runs: dict[str, list[float]] = {"sweep": [], "separate": [], "decode only": []}
    passes: dict[str, int] = {"decode only": 1}
    top1: dict[str, list[float | None]] = {}
    for _ in range(args.repeats):
        seconds, passes["sweep"], rows = validate_once(paths, settings)
        runs["sweep"].append(seconds)
        top1["sweep"] = [row.top1 for row in rows]
        separate = [validate_once([path], settings) for path in paths]
        runs["separate"].append(sum(s for s, _, _ in separate))
        passes["separate"] = sum(n for _, n, _ in separate)
        top1["separate"] = [rows[0].top1 for _, _, rows in separate]
        runs["decode only"].append(decode_seconds(settings, args))
    if top1["sweep"] != top1["separate"]:
        raise RuntimeError(f"sweep and separate runs disagree on top-1: {top1}")
    samples, results = settings.expected_samples, {}
    for name, times in runs.items():
        models = 0 if name == "decode only" else len(paths)
        results[name] = {"seconds": statistics.median(times), "all_seconds": times, "loader_passes": passes[name],
                         "samples_decoded": passes[name] * samples,
                         "model_images_per_s": models * samples / statistics.median(times)}
    return results


def print_table(results: dict[str, dict], args: argparse.Namespace, samples: int, ratio: float) -> None:
    print(f"\n{args.checkpoints} x {args.model} checkpoints, {samples} samples at {args.img_size} px "
          f"(crop {args.crop_pct}), batch {args.batch_size}, workers {args.workers}, median of {args.repeats}")
    print(f"{'way':<12}{'passes':>8}{'decoded':>9}{'seconds':>9}{'model img/s':>13}")
    for name, row in results.items():
        print(f"{name:<12}{row['loader_passes']:>8}{row['samples_decoded']:>9}{row['seconds']:>9.2f}"
              f"{row['model_images_per_s']:>13.1f}")
    print(f"sweep is {ratio:.2f}x faster than {args.checkpoints} separate runs "
          f"(decoding is {results['decode only']['seconds'] / results['sweep']['seconds']:.0%} of the sweep's time)")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # per-core figures
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            shards = expand_urls(args.data)
        else:
            width, height = (int(v) for v in args.size.lower().split("x"))
            shards = expand_urls(str(make_shards(Path(tmp), args.images, width, height)[0] / "train-*.tar"))
        num_classes = int((read_info(shards) or {}).get("num_classes") or 1000)
        paths = make_checkpoints(Path(tmp), args, num_classes)
        samples, source = expected_samples(shards)
        settings = SweepSettings(tuple(shards), samples, source, batch_size=args.batch_size, workers=args.workers)
        results = time_both(paths, settings, args)
    ratio = results["separate"]["seconds"] / results["sweep"]["seconds"]
    print_table(results, args, samples, ratio)
    if args.out:
        out = {"machine": machine(), "settings": vars(args), "samples": samples,
               "separate_over_sweep": ratio, "results": results}
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
