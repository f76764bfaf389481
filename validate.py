"""Validate checkpoints and timm models on webdataset val shards; sweep sizes and crops.

    python validate.py --checkpoint runs/demo_digits --data 'shards/digits/val-{000000..000001}.tar'

Rows, passes, columns and exit status: README "Validation and sweeps"; exact counts: docs/design.md §4.9, §5.5."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from hrnet_cls.config import MIN_IMG_SIZE
from hrnet_cls.data import expand_urls
from hrnet_cls.data.remote import READ_TIMEOUT_S, RETRIES
from hrnet_cls.distributed import barrier, choose_device, cleanup, init_distributed
from hrnet_cls.precision import PRECISIONS, Precision
from hrnet_cls.validation import (RESULT_FORMATS, Row, SweepError, SweepSettings, build_rows, checkpoint_specs,
                                  describe_all, expected_samples, format_table, model_specs, run_sweep, write_results)

logger = logging.getLogger("validate")


class UsageError(ValueError):
    """A command-line mistake: reported in one line, exit status 2, before anything loads."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", default=[], metavar="PATH",
                   help="our training checkpoints: files, globs, or directories (every *.pth in them)")
    p.add_argument("--model", nargs="+", default=[], metavar="NAME",
                   help="timm model names or patterns (hrnet_w18*_c), with pretrained weights or --weights; "
                        "local-dir:FOLDER = a timm model folder (config.json + weights, e.g. from "
                        "python -m hrnet_cls.export), validated with its own preprocessing")
    p.add_argument("--weights", default="", metavar="FILE",
                   help="state dict for --model: plain (timm's, the authors') or under state_dict/model")
    p.add_argument("--data", required=True, metavar="SHARDS", help="val shards, e.g. 'val-{000000..000063}.tar'")
    p.add_argument("--img-size", nargs="+", type=int, default=[], metavar="PX",
                   help="crop sides to sweep, pixels (default: the checkpoint's config / pretrained_cfg)")
    p.add_argument("--crop-pct", nargs="+", type=float, default=[], metavar="F",
                   help="centre-crop fractions to sweep, in (0, 1] (default: as --img-size)")
    p.add_argument("--use-ema", action="store_true", help="validate the EMA weights")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--channels-last", action="store_true", help="NHWC activations (faster on tensor cores)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model, weights frozen (inductor freezing): slow first batch; for large sweeps")
    p.add_argument("--no-fold-bn", action="store_true",
                   help="keep BatchNorm layers (default: folded into the convolutions, same top-1/top-5, faster)")
    p.add_argument("--batch-size", type=int, default=256, help="images per process per forward")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding processes per rank")
    p.add_argument("--num-classes", type=int, default=None, help="override the classifier size of every model")
    p.add_argument("--device", default="", help="e.g. cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--max-models-per-pass", type=int, default=0, metavar="N",
                   help="models resident at once per preprocessing group (0 = all of them)")
    p.add_argument("--retries", type=int, default=RETRIES, metavar="N",
                   help="times a remote shard read (http(s), pipe:) that is cut or stalls is continued")
    p.add_argument("--read-timeout-s", type=float, default=READ_TIMEOUT_S, metavar="S",
                   help="seconds without data before a remote read counts as failed")
    p.add_argument("--results-file", default="", metavar="OUT",
                   help="write the rows to OUT: timm's validate.py columns first, then ours")
    p.add_argument("--results-format", choices=RESULT_FORMATS, default="",
                   help="as timm's validate.py (default: json for a .json file, else csv)")
    return p.parse_args(argv)


def check_usage(args: argparse.Namespace) -> None:
    """Reject impossible arguments with one line each (UsageError)."""
    if not args.checkpoint and not args.model:
        raise UsageError("nothing to validate: give --checkpoint PATH ... and/or --model NAME ...")
    if args.weights and not args.model:
        raise UsageError("--weights FILE needs --model NAME (the architecture it is for)")
    if any(size < MIN_IMG_SIZE for size in args.img_size):
        raise UsageError(f"--img-size must be >= {MIN_IMG_SIZE} pixels (HRNet's lowest stream has stride 32), "
                         f"got {args.img_size}")
    if args.results_file:  # found now, not after the whole sweep
        out = Path(args.results_file)
        folder = out.parent if str(out.parent) else Path(".")
        if out.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            why = "is a directory" if out.is_dir() else f"{folder} is not a writable directory"
            raise UsageError(f"--results-file {args.results_file}: {why}")
    if any(not 0 < crop <= 1 for crop in args.crop_pct):
        raise UsageError(f"--crop-pct values must lie in (0, 1], got {args.crop_pct}")
    if args.retries < 0 or args.read_timeout_s <= 0:
        raise UsageError("--retries must be >= 0 and --read-timeout-s > 0")
    if args.batch_size < 1 or args.workers < 0 or args.max_models_per_pass < 0:
        raise UsageError("--batch-size must be >= 1, --workers and --max-models-per-pass >= 0")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env_rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if env_rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # checked on every rank before any process group or model exists
    try:
        check_usage(args)
        shards = expand_urls(args.data)
        device = choose_device(args.device, int(os.environ.get("LOCAL_RANK", "0")),
                               int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available(), "--device")
        precision = Precision.of(args.precision, device)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # UsageError is a ValueError
        if env_rank == 0:
            print(f"validate.py: error: {exc}", file=sys.stderr)
        return 2
    expected, source = expected_samples(shards)
    logger.info("%d shard(s) of %s: %d samples expected (%s)", len(shards), args.data, expected, source)
    settings = SweepSettings(tuple(shards), expected, source, args.batch_size, args.workers, device, precision,
                             args.channels_last, args.use_ema, args.max_models_per_pass, not args.no_fold_bn,
                             args.compile, args.retries, args.read_timeout_s)
    dist_info = init_distributed(device=device)  # the backend follows the device: gloo for cpu, NCCL for its GPU
    try:
        specs = checkpoint_specs(args.checkpoint) + model_specs(args.model, args.weights)
        specs = describe_all(specs, use_ema=args.use_ema, num_classes=args.num_classes)
        rows = build_rows(specs, args.img_size, args.crop_pct)
        run_sweep(rows, settings, dist_info)
        # the other ranks wait for rank 0's report: torchrun stops every process once one exits non-zero
        if dist_info.is_main:
            report(rows, args.results_file, args.results_format)
        barrier()
    except SweepError as exc:
        if dist_info.is_main:
            print(f"validate.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 1 if any(row.error for row in rows) else 0


def report(rows: list[Row], results_file: str, results_format: str) -> None:
    print(format_table(rows), flush=True)
    if results_file:
        write_results(rows, results_file, results_format)
        logger.info("wrote %d row(s) to %s", len(rows), results_file)


if __name__ == "__main__":
    sys.exit(main())
