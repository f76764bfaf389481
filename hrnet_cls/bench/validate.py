"""validate.py against timm's validate.py: images/s on the same weights, shards, threads and device.

    python -m hrnet_cls.bench validate                      # hrnet_w18_c vs timm hrnet_w18, CPU fp32, 2 threads
    python -m hrnet_cls.bench validate --images 256 --batch-size 32 --out validate.json
    python -m hrnet_cls.bench validate --compile-ours    # ours compiled (weights frozen), timm's as it runs by default
    python -m hrnet_cls.bench validate --device cuda --precision bf16 --compile --batch-size 1024 --images 8192

One set of weights (timm's ``--timm-model`` randomly initialised, BatchNorm statistics
calibrated on a few batches) is saved as a plain state dict; synthetic ImageNet-sized JPEG
shards are written (500x375, ~110 KB, as ``bench data``). Then, in one process, interleaved
(ours, timm, ours, ...), median of ``--repeats``, model creation and loading included:

- ours: what validate.py runs for ``--model OURS --weights FILE``: describe, one pass of
  hrnet_cls.validation (BatchNorm folded unless --no-fold-bn, our loader, inference_mode);
- timm: the calls of timm's validate.py ``validate()`` with its defaults: ``create_model`` +
  ``load_checkpoint``, ``resolve_data_config``, ``create_dataset('wds/...')`` over the same
  shards, ``create_loader`` (its prefetcher on), a warm-up batch, ``inference_mode``,
  cross-entropy and ``timm.utils.accuracy`` per batch.

With --compile or --compile-ours, one untimed run of each compiled side comes first: torch's
compile caches then hold the graphs, as for every checkpoint after the first of a sweep of one
architecture; its seconds are reported as the compile's cold start.

Two rates per side: end to end (images / seconds of the whole run) and steady, the rate a long
sweep such as ImageNet's 50,000 val images approaches: (images - start_images) / the
difference of the run times over the two shard sets, start-up costs cancelled (timm's
validate.py logs a per-batch rate of that kind). Both count every sample of the shards; their
top-1/top-5 must agree to within 2% of the samples (same weights, and our eval transform is
timm's pixel for pixel; float-level differences can flip near ties of a random model), or the
benchmark fails. ratio = ours / timm images/s; the target is 1.9 on CPU fp32. Last, each side's
model alone (model_alone): the bound the data path and start-up work against.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import timm
import timm.data
import torch

import hrnet_cls  # noqa: F401  (registers the models)
from hrnet_cls.bench.data import machine, make_shards
from hrnet_cls.data import expand_urls
from hrnet_cls.distributed import DistInfo
from hrnet_cls.fusion import fold_batchnorm
from hrnet_cls.precision import Precision
from hrnet_cls.timing import synchronize
from hrnet_cls.validation import SweepSettings, build_rows, describe_all, expected_samples, model_specs, run_sweep


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrnet_cls.bench validate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="hrnet_w18_c", help="ours")
    p.add_argument("--timm-model", default="hrnet_w18", help="timm's implementation of the same architecture")
    p.add_argument("--images", type=int, default=64, help="synthetic val images")
    p.add_argument("--start-images", type=int, default=0,
                   help="images of the second, smaller shard set of the steady rate (default images // 4)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, both sides")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--compile-ours", action="store_true", help="validate.py --compile, timm's uncompiled (its default)")
    p.add_argument("--no-fold-bn", action="store_true", help="ours without BatchNorm folding")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def make_weights(args: argparse.Namespace, path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(args.timm_model).train()
    with torch.no_grad():
        for _ in range(3):  # realistic BN statistics: folding and accuracy then mean something
            model(torch.randn(4, 3, 96, 96))
    torch.save(model.state_dict(), path)


def run_ours(args: argparse.Namespace, weights: Path, shards: list[str]) -> tuple[float, tuple[int, int, int]]:
    start = time.perf_counter()
    device = torch.device(args.device)
    samples, source = expected_samples(shards)
    settings = SweepSettings(tuple(shards), samples, source, batch_size=args.batch_size, workers=args.workers,
                             device=device, precision=Precision.of(args.precision, device),
                             fold_bn=not args.no_fold_bn, compile=args.compile or getattr(args, "compile_ours", False))
    rows = build_rows(describe_all(model_specs([args.model], str(weights))), [args.img_size], [args.crop_pct])
    run_sweep(rows, settings, DistInfo(0, 0, 1, device, True))
    synchronize(device)
    seconds, row = time.perf_counter() - start, rows[0]
    if row.error:
        raise RuntimeError(row.error)
    return seconds, (round(row.top1 * row.samples / 100), round(row.top5 * row.samples / 100), row.samples)


def run_timm(args: argparse.Namespace, weights: Path, root: Path) -> tuple[float, tuple[int, int, int]]:
    """timm's validate.py validate(), its default arguments, without the logging."""
    start = time.perf_counter()
    device = torch.device(args.device)
    model = timm.create_model(args.timm_model, pretrained=False, num_classes=1000, in_chans=3)
    timm.models.load_checkpoint(model, str(weights), use_ema=False)
    config = timm.data.resolve_data_config({"input_size": (3, args.img_size, args.img_size),
                                            "crop_pct": args.crop_pct}, model=model)
    model = model.to(device)
    if args.compile:
        model = torch.compile(model)
    dataset = timm.data.create_dataset(root=str(root), name="wds/bench", split="train", is_training=False)
    loader = timm.data.create_loader(dataset, input_size=config["input_size"], batch_size=args.batch_size,
                                     use_prefetcher=True, interpolation=config["interpolation"],
                                     mean=config["mean"], std=config["std"], num_workers=args.workers,
                                     crop_pct=config["crop_pct"], crop_mode=config["crop_mode"], device=device)
    autocast = Precision.of(args.precision, device).autocast
    criterion, hits = torch.nn.CrossEntropyLoss().to(device), [0.0, 0.0, 0]
    model.eval()
    with torch.inference_mode():
        with autocast():
            model(torch.randn((args.batch_size,) + tuple(config["input_size"]), device=device))  # its warm-up
        for images, targets in loader:
            with autocast():
                output = model(images)
                criterion(output, targets)
            acc1, acc5 = timm.utils.accuracy(output, targets, topk=(1, 5))
            hits = [hits[0] + acc1.item() * len(targets) / 100, hits[1] + acc5.item() * len(targets) / 100,
                    hits[2] + len(targets)]
    synchronize(device)
    return time.perf_counter() - start, (round(hits[0]), round(hits[1]), hits[2])


def model_alone(args: argparse.Namespace, weights: Path) -> dict[str, float]:
    """images/s of each side's model without data: the same random batch, median of 4 forwards
    after one, as each validate path runs it (ours folded unless --no-fold-bn, NHWC, compiled
    with frozen weights under --compile / --compile-ours; timm's NCHW, compiled under --compile)."""
    device = torch.device(args.device)
    timm_model = timm.create_model(args.timm_model)
    timm_model.load_state_dict(torch.load(weights, weights_only=True))
    ours = timm.create_model(args.model)
    ours.load_state_dict(timm_model.state_dict())
    ours = ours.eval() if args.no_fold_bn else fold_batchnorm(ours, check=torch.randn(2, 3, 64, 64))
    ours = ours.to(device, memory_format=torch.channels_last)
    timm_model = timm_model.eval().to(device)
    if args.compile or args.compile_ours:
        ours = torch.compile(ours, options={"freezing": True})
    if args.compile:
        timm_model = torch.compile(timm_model)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    autocast = Precision.of(args.precision, device).autocast
    rates = {}
    for name, model in (("ours", ours), ("timm", timm_model)):
        times = []
        with torch.inference_mode(), autocast():
            for _ in range(5):
                synchronize(device)
                start = time.perf_counter()
                model(x)
                synchronize(device)
                times.append(time.perf_counter() - start)
        rates[name] = args.batch_size / statistics.median(times[1:])
    return rates


def fmt_rate(rate: float | None) -> str:
    return f"{rate:7.1f}" if rate else "      -"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    small = args.start_images or args.images // 4
    if not 0 < small < args.images:
        raise SystemExit(f"error: --start-images {small} must be between 0 and --images {args.images}")
    sizes = {"full": args.images, "start": small}
    times: dict[str, dict[str, list[float]]] = {size: {"ours": [], "timm": []} for size in sizes}
    counts: dict[str, dict[str, tuple[int, int, int]]] = {size: {} for size in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pth"
        make_weights(args, weights)
        roots = {size: make_shards(Path(tmp) / size, n, 500, 375)[0] for size, n in sizes.items()}
        cold = {}
        if args.compile or args.compile_ours:  # fill the compile caches, as the first checkpoint of a sweep does
            cold["ours"] = run_ours(args, weights, expand_urls(str(roots["start"] / "train-*.tar")))[0]
            if args.compile:
                cold["timm"] = run_timm(args, weights, roots["start"])[0]
        for _ in range(args.repeats):
            for size, root in roots.items():
                seconds, counts[size]["ours"] = run_ours(args, weights, expand_urls(str(root / "train-*.tar")))
                times[size]["ours"].append(seconds)
                seconds, counts[size]["timm"] = run_timm(args, weights, root)
                times[size]["timm"].append(seconds)
        alone = model_alone(args, weights)
    # float-level differences (NHWC kernels, the prefetcher's normalisation, folding) can move a
    # random model's near-tied logits across the top-5 boundary; a geometry error moves many
    for size, n in sizes.items():
        ours, theirs = counts[size]["ours"], counts[size]["timm"]
        if ours[2] != theirs[2] or max(abs(a - b) for a, b in zip(ours, theirs)) > max(1, 0.02 * n):
            raise RuntimeError(f"ours and timm's validation disagree on {n} images (top-1, top-5, samples): "
                               f"ours {ours}, timm {theirs}")
    median = {size: {k: statistics.median(v) for k, v in t.items()} for size, t in times.items()}
    rate = {k: args.images / median["full"][k] for k in ("ours", "timm")}
    # None where the larger run was not slower: noise swamped the difference (too few images)
    steady = {k: (args.images - small) / spent if (spent := median["full"][k] - median["start"][k]) > 0 else None
              for k in ("ours", "timm")}
    ratio = rate["ours"] / rate["timm"]
    steady_ratio = steady["ours"] / steady["timm"] if steady["ours"] and steady["timm"] else None
    compiled = " compile (both)" if args.compile else " compile (ours)" if args.compile_ours else ""
    print(f"{args.images} and {small} images at {args.img_size} px (crop {args.crop_pct}), batch {args.batch_size}, "
          f"{args.threads} threads, {args.device} {args.precision}{compiled}, median of {args.repeats}; "
          f"top-1/top-5/samples: ours {counts['full']['ours']}, timm {counts['full']['timm']}")
    for name in ("ours", "timm"):
        print(f"  {name:<5} {median['full'][name]:7.2f} s ({median['start'][name]:.2f} s for {small})  "
              f"{rate[name]:7.1f} images/s end to end  {fmt_rate(steady[name])} steady")
    print(f"  model alone (no data, batch {args.batch_size}): ours {alone['ours']:.1f}, timm {alone['timm']:.1f} "
          f"images/s: {alone['ours'] / alone['timm']:.2f}x")
    for name, seconds in cold.items():
        print(f"  {name:<5} first run, compiling: {seconds:.2f} s for {small} images (the timed runs reuse its caches)")
    print(f"validate.py is {ratio:.2f}x timm's validate.py end to end on {args.images} images, "
          + (f"{steady_ratio:.2f}x steady" if steady_ratio else "steady not measurable: use more --images"))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "machine": machine(), "settings": vars(args), "images": sizes, "seconds": times,
            "images_per_s": rate, "steady_images_per_s": steady, "ratio": ratio, "steady_ratio": steady_ratio,
            "counts": counts, "compiling_first_run_s": cold,
            "model_alone_images_per_s": alone}, indent=1))
    return 0
