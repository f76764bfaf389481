"""Validation: validate.py against timm's validate.py, each model alone, a checkpoint sweep against separate runs.

    python -m benchmarks validate                                # hrnet_w18_c vs timm hrnet_w18, CPU fp32, 2 threads
    python -m benchmarks validate --images 128 --start-images 32 --compile-ours --out results
    python -m benchmarks validate --parts sweep --data 'shards/digits/val-*.tar' --img-size 32
    python -m benchmarks validate --device cuda --precision bf16 --compile-ours --batch-size 1024 --images 8192

Weights: timm's --timm-model, random, BatchNorm calibrated. e2e: validate.py's calls (folded unless
--no-fold-bn, our loader) against timm's validate.py validate() with its defaults, whole runs timed
(Timer warms up: compile caches hold the graphs; first_s is the cold run), top-1/top-5 agreeing within
2%; steady = (images - start) / the run time difference over two shard sets. model: each side's model
alone as its path runs it (ours folded, NHWC, frozen and compiled with --compile-ours; timm's eager).
sweep: --checkpoints checkpoints in one sweep (each batch decoded once) against one run each.
"""
import argparse
import math
import tempfile
from pathlib import Path

import timm
import timm.data
import torch

import hrnet_cls  # noqa: F401  (registers the models)
from hrnet_cls.train.state import Position, build_state, save_checkpoint
from hrnet_cls.data import build_val_loader, expand_urls, read_info
from hrnet_cls.data.workers import usable_cores
from hrnet_cls.distributed import DistInfo
from hrnet_cls.models.inference import fold_batchnorm
from hrnet_cls.precision import Precision
from hrnet_cls.validation import (SweepSettings, build_rows, checkpoint_specs, describe_all, expected_samples,
                                  model_specs, run_sweep)

from benchmarks import harness
from benchmarks.data import Shards, make_shards

SMOKE = dict(model="hrnet_w18_small_c", timm_model="hrnet_w18_small", sweep_model="hrnet_tiny_c", images=8,
             start_images=4, checkpoints=2, img_size=32, batch_size=4, size="96x72")
PARTS = ("e2e", "model", "sweep")
SIDES = {"ours": lambda args: args.model, "timm": lambda args: args.timm_model}


def options() -> argparse.ArgumentParser:
    p = harness.parser("validate", __doc__, threads=2)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--model", default="hrnet_w18_c", help="ours")
    p.add_argument("--timm-model", default="hrnet_w18", help="timm's implementation of the same architecture")
    p.add_argument("--data", default="", help="val shards to use (default: write synthetic ones)")
    p.add_argument("--images", type=int, default=64, help="synthetic val images")
    p.add_argument("--start-images", type=int, default=16, help="images of the second shard set (0 = no steady rate)")
    p.add_argument("--size", default="500x375", help="synthetic image WIDTHxHEIGHT")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--crop-pct", type=float, default=0.875)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, both sides")
    p.add_argument("--compile-ours", action="store_true", help="validate.py --compile, timm's eager (its default)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--no-fold-bn", action="store_true", help="ours without BatchNorm folding")
    p.add_argument("--sweep-model", default="hrnet_tiny_c", help="the sweep's checkpoints' model")
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints in the sweep")
    return p


def settings(args: argparse.Namespace, shards: list[str], compiled: bool) -> SweepSettings:
    device = torch.device(args.device)
    return SweepSettings(tuple(shards), *expected_samples(shards), batch_size=args.batch_size, workers=args.workers,
                         device=device, precision=Precision.of(args.precision, device), fold_bn=not args.no_fold_bn,
                         compile=compiled)


def run_ours(args: argparse.Namespace, weights: Path, shards: Shards) -> tuple[int, int, int]:
    """validate.py --model OURS --weights FILE: (top-1 hits, top-5 hits, samples)."""
    rows = build_rows(describe_all(model_specs([args.model], str(weights))), [args.img_size], [args.crop_pct])
    run_sweep(rows, settings(args, expand_urls(shards.pattern), args.compile_ours),
              DistInfo(0, 0, 1, torch.device(args.device), True))
    if rows[0].error:
        raise RuntimeError(rows[0].error)
    return round(rows[0].top1 * rows[0].samples / 100), round(rows[0].top5 * rows[0].samples / 100), rows[0].samples


def run_timm(args: argparse.Namespace, weights: Path, shards: Shards) -> tuple[int, int, int]:
    """timm's validate.py validate() with its default arguments, without the logging."""
    device = torch.device(args.device)
    model = timm.create_model(args.timm_model, pretrained=False, num_classes=1000, in_chans=3)
    timm.models.load_checkpoint(model, str(weights), use_ema=False)
    config = timm.data.resolve_data_config({"input_size": (3, args.img_size, args.img_size),
                                            "crop_pct": args.crop_pct}, model=model)
    model = model.to(device)
    dataset = timm.data.create_dataset(root=str(shards.root), name="wds/bench", split=shards.split, is_training=False)
    loader = timm.data.create_loader(dataset, input_size=config["input_size"], batch_size=args.batch_size,
                                     use_prefetcher=True, interpolation=config["interpolation"], mean=config["mean"],
                                     std=config["std"], num_workers=args.workers, crop_pct=config["crop_pct"],
                                     crop_mode=config["crop_mode"], device=device)
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
            n = len(targets)
            hits = [hits[0] + acc1.item() * n / 100, hits[1] + acc5.item() * n / 100, hits[2] + n]
    return round(hits[0]), round(hits[1]), hits[2]


def e2e_rows(args: argparse.Namespace, weights: Path, sets: dict[str, Shards]) -> dict[str, dict]:
    """Both sides over each shard set, interleaved; the counts of the two sides checked against each other."""
    counts, images = {}, {size: expected_samples(expand_urls(s.pattern))[0] for size, s in sets.items()}
    fns = {(side, size): lambda side=side, size=size: counts.__setitem__((side, size), (
        run_ours if side == "ours" else run_timm)(args, weights, sets[size])) for size in sets for side in SIDES}
    timed = harness.measure(fns, args, first=args.compile_ours)
    rows = {side: harness.timed_row(timed[side, "full"], images["full"], model=SIDES[side](args),
                                    hits_top1_top5_samples=list(counts.get((side, "full"), ()))) for side in SIDES}
    for side, row in rows.items():
        start = timed.get((side, "start"), {})
        spent = row.get("median_s", 0) - start.get("median_s", math.inf)
        row.update(start_median_s=start.get("median_s"), start_error=start.get("error"),
                   steady_images_per_s=(images["full"] - images["start"]) / spent if spent > 0 else None)
    for size, n in images.items():  # float-level differences can flip near-tied logits of a random model; not many
        ours, theirs = counts.get(("ours", size)), counts.get(("timm", size))
        if ours and theirs and (ours[2] != theirs[2] or max(abs(a - b) for a, b in zip(ours, theirs)) > max(1, n / 50)):
            rows["ours"]["error"] = f"ours and timm disagree on {n} images (top-1, top-5, samples): {ours} vs {theirs}"
    for key in ("images_per_s", "steady_images_per_s"):
        rows["ours"][key.replace("images_per_s", "vs_timm")] = harness.ratio(rows["ours"].get(key),
                                                                             rows["timm"].get(key))
    return rows


def model_rows(args: argparse.Namespace, weights: Path) -> dict[str, dict]:
    device = torch.device(args.device)
    theirs = timm.create_model(args.timm_model)
    theirs.load_state_dict(torch.load(weights, weights_only=True))
    ours = timm.create_model(args.model)
    ours.load_state_dict(theirs.state_dict())
    ours = ours.eval() if args.no_fold_bn else fold_batchnorm(ours, check=torch.randn(2, 3, 64, 64))
    models = {"ours": ours.to(device, memory_format=torch.channels_last), "timm": theirs.eval().to(device)}
    if args.compile_ours:  # as validate.py --compile: the weights frozen (an inductor option)
        frozen = {"options": {"freezing": True}} if args.compile_backend == "inductor" else {}
        models["ours"] = torch.compile(models["ours"], backend=args.compile_backend, **frozen)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    inputs, autocast = {"ours": x.contiguous(memory_format=torch.channels_last), "timm": x}, Precision.of(
        args.precision, device).autocast

    def forward(side: str) -> None:
        with torch.inference_mode(), autocast():
            models[side](inputs[side])
    timed = harness.measure({side: lambda side=side: forward(side) for side in SIDES}, args, first=True)
    setting = {"ours": f"{getattr(ours, 'folded_batchnorms', 0)} BatchNorms folded, NHWC, "
                       + (f"compile {args.compile_backend}" if args.compile_ours else "eager"),
               "timm": "NCHW, no fold, eager"}
    rows = {side: harness.timed_row(timed[side], args.batch_size, model=SIDES[side](args), batch=args.batch_size,
                                    setting=setting[side]) for side in SIDES}
    rows["ours"]["vs_timm"] = harness.ratio(rows["ours"].get("images_per_s"), rows["timm"].get("images_per_s"))
    return rows


def sweep_rows(args: argparse.Namespace, tmp: Path, shards: Shards) -> dict[str, dict]:
    urls = expand_urls(shards.pattern)
    classes = int((read_info(urls) or {}).get("num_classes") or 1000)
    config = {"model": {"name": args.sweep_model, "num_classes": classes},
              "data": {"img_size": args.img_size, "crop_pct": args.crop_pct}}
    paths = [str(tmp / f"ckpt_{seed}.pth") for seed in range(args.checkpoints)]
    for seed, path in enumerate(paths):
        torch.manual_seed(seed)
        model = timm.create_model(args.sweep_model, num_classes=classes)
        save_checkpoint(path, build_state(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          position=Position(1, 1), config=config))
    sweep_settings, top1 = settings(args, urls, False), {}

    def validate(name: str, group: list[str]) -> None:
        rows = build_rows(describe_all(checkpoint_specs(group)))
        run_sweep(rows, sweep_settings, DistInfo(0, 0, 1, torch.device(args.device), True))
        if any(row.error for row in rows):
            raise RuntimeError("; ".join(row.error for row in rows if row.error))
        top1.setdefault(name, []).extend(row.top1 for row in rows)

    def decode_only() -> None:
        for _ in build_val_loader(urls, batch_size=args.batch_size, img_size=args.img_size, crop_pct=args.crop_pct,
                                  workers=args.workers):
            pass
    timed = harness.measure({"sweep": lambda: validate("sweep", paths), "decode only": decode_only,
                             "separate": lambda: [validate("separate", [path]) for path in paths]}, args)
    samples, n = sweep_settings.expected_samples, len(paths)
    if top1.get("sweep", [])[:n] != top1.get("separate", [])[:n]:
        raise RuntimeError(f"sweep and separate runs disagree on top-1: {top1}")
    rows = {name: harness.timed_row(timed[name], models * samples, model=args.sweep_model, checkpoints=n,
                                    loader_passes=passes, samples_decoded=passes * samples)
            for name, passes, models in (("sweep", 1, n), ("separate", n, n), ("decode only", 1, 0))}
    sweep = rows["sweep"].get("median_s")
    rows["separate"]["separate_over_sweep"] = harness.ratio(rows["separate"].get("median_s"), sweep)
    rows["decode only"]["of_sweep"] = harness.ratio(rows["decode only"].get("median_s"), sweep)
    return rows


def run(args: argparse.Namespace, report: harness.Report) -> None:
    if not args.data and not 0 <= args.start_images < args.images:
        raise SystemExit(f"error: --start-images {args.start_images} must be 0 or less than --images {args.images}")
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as tmp:
        sets = {"full": Shards.of(args.data)} if args.data else {
            size: make_shards(Path(tmp) / size, n, args.size, workers=usable_cores())
            for size, n in (("full", args.images), ("start", args.start_images)) if n}
        torch.manual_seed(0)
        weights, model = Path(tmp) / "weights.pth", timm.create_model(args.timm_model).train()
        with torch.no_grad():
            for _ in range(3):  # realistic BatchNorm statistics: folding and accuracy then mean something
                model(torch.randn(4, 3, 96, 96))
        torch.save(model.state_dict(), weights)
        title = f"at {args.img_size} px (crop {args.crop_pct}), batch {args.batch_size}, {args.device} {args.precision}"
        parts = {"e2e": ("validate.py against timm's validate.py (median_s: one whole run)",
                         lambda: e2e_rows(args, weights, sets)),
                 "model": ("Each model alone (median_s: one batch)", lambda: model_rows(args, weights)),
                 "sweep": (f"A {args.checkpoints}-checkpoint sweep against separate runs (median_s: all of them)",
                           lambda: sweep_rows(args, Path(tmp), sets["full"]))}
        for part in args.parts:
            report.row(report.section(part, f"{parts[part][0]}, {title}"), part, parts[part][1], many=True)


def main(argv: list[str]) -> int:
    return harness.cli("validate", options(), run, argv, SMOKE)
