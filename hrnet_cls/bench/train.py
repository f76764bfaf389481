"""Training-loop overhead, host reads per step, and end-to-end training speed.

    python -m hrnet_cls.bench train                                   # CPU: trivial + hrnet_tiny_c, digits
    python -m hrnet_cls.bench train --models hrnet_w18_c --img-size 224 --batch 64 \\
        --device cuda --precision bf16 --channels-last                # a GPU

1. Overhead: the same in-memory batches go through a bare loop (forward, loss, backward,
   SGD step) and through engine.train_one_epoch (LR schedule, device-side loss meter, EMA
   no-op, log line every --log-interval steps). Passes alternate (bare, engine, bare, ...)
   so drift of the machine hits both; reported: median seconds per step of each, and the
   difference per step. ``trivial`` is one linear layer, where the loop's own cost shows.
2. Host reads: tensor values read on the host (item, tolist, bool, float, ... each a device
   sync on a GPU) during one train_one_epoch, counted by a TorchFunctionMode, for
   log_interval = steps and = 1: per-step reads = (count - reads at log points) / steps.
   On CUDA, torch.cuda.set_sync_debug_mode("warn") counts the synchronising calls too.
3. End to end: train_one_epoch over the real training loader on the digits shards
   (decode + augment in --workers DataLoader workers): images/s including the input pipeline.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import timm
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hrnet_cls import MODEL_CFGS  # importing hrnet_cls registers the models
from hrnet_cls.config import Config
from hrnet_cls.data import build_train_loader
from hrnet_cls.distributed import DistInfo
from hrnet_cls.engine import TrainParts, build_parts, train_one_epoch
from hrnet_cls.precision import Precision
from hrnet_cls.preemption import StopRequest
from hrnet_cls.timing import synchronize
from hrnet_cls.tracking import Tracker

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "shards" / "digits" / "train-{000000..000007}.tar")
NO_STOP = StopRequest()  # no handlers installed: never asks to stop
HOST_READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"})


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by Python (each one waits for the device on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += getattr(func, "__name__", "") in HOST_READS
        return func(*args, **(kwargs or {}))


class Batches:
    """In-memory batches with the TrainLoader interface train_one_epoch uses."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor, int, np.ndarray]]) -> None:
        self.batches = batches
        self.batches_per_epoch = len(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def progress(self, batch: int) -> tuple[float, float]:
        return batch / len(self.batches), (batch + 1) / len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int, np.ndarray]]:
        return iter(self.batches)


def make_model(name: str, num_classes: int, img_size: int, channels_last: bool = False) -> nn.Module:
    if name == "trivial":  # the loop's own cost dominates a step of this
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * img_size * img_size, num_classes))
    layout = {"channels_last": channels_last} if name in MODEL_CFGS else {}  # as train.py builds it
    return timm.create_model(name, num_classes=num_classes, **layout)


def make_parts(model: nn.Module, log_interval: int, device: str = "cpu",
               precision: str = "fp32", channels_last: bool = False) -> TrainParts:
    """TrainParts as train.py builds them (one process, no EMA, no mid-epoch saves)."""
    cfg = Config()
    cfg.optim.lr, cfg.schedule.decay_epochs, cfg.schedule.epochs = 0.01, [], 1
    cfg.train.log_interval, cfg.train.channels_last, cfg.checkpoint.save_interval = log_interval, channels_last, 0
    device = torch.device(device)
    net = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return build_parts(cfg, DistInfo(0, 0, 1, device, True), net, Precision.of(precision, device))


def bare_pass(parts: TrainParts, batches: Batches) -> float:
    """Seconds per step of the minimal loop over the same objects."""
    start = time.perf_counter()
    for images, targets, *_ in batches:
        images = images.to(parts.device, non_blocking=True, memory_format=parts.memory_format)
        targets = targets.to(parts.device, non_blocking=True)
        with parts.autocast:
            loss = parts.criterion(parts.model(images), targets)
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    synchronize(parts.device)
    return (time.perf_counter() - start) / len(batches)


def engine_pass(parts: TrainParts, batches: Batches, tracker: Tracker) -> float:
    start = time.perf_counter()
    train_one_epoch(parts, batches, epoch=0, global_step=0, tracker=tracker, save=lambda *a: None, stop=NO_STOP)
    synchronize(parts.device)  # the epoch summary already read the device; this is for symmetry
    return (time.perf_counter() - start) / len(batches)


def overhead(name: str, args: argparse.Namespace, tracker: Tracker) -> dict[str, Any]:
    torch.manual_seed(0)
    device = torch.device(args.device)
    batches = Batches([(torch.randn(args.batch, 3, args.img_size, args.img_size, device=device),
                        torch.randint(0, 10, (args.batch,), device=device), 0, np.arange(args.batch))
                       for _ in range(args.steps)])
    parts = make_parts(make_model(name, 10, args.img_size, args.channels_last), args.log_interval, args.device,
                       args.precision, args.channels_last)
    bare_pass(parts, batches), engine_pass(parts, batches, tracker)  # warm-up (allocator, kernels)
    bare, engine = [], []
    for _ in range(args.repeats):
        bare.append(bare_pass(parts, batches))
        engine.append(engine_pass(parts, batches, tracker))
    reads = {}
    for interval in (len(batches), 1):  # reads at log points: 1 per log + 1 for the epoch summary
        parts.log_interval = interval
        with HostReads() as counter:
            engine_pass(parts, batches, tracker)
        reads[interval] = counter.count
    result = {"model": name, "steps": len(batches), "bare_s_per_step": statistics.median(bare),
              "engine_s_per_step": statistics.median(engine),
              "host_reads_log_every_epoch": reads[len(batches)], "host_reads_log_every_step": reads[1],
              "host_reads_per_step": (reads[len(batches)] - 2) / len(batches)}
    result["overhead_us_per_step"] = 1e6 * (result["engine_s_per_step"] - result["bare_s_per_step"])
    if device.type == "cuda":
        result["cuda_sync_warnings"] = cuda_syncs(parts, batches, tracker, args.log_interval)
    return result


def cuda_syncs(parts: TrainParts, batches: Batches, tracker: Tracker, log_interval: int) -> int:
    """Synchronising CUDA calls in one epoch, as torch's sync debug mode reports them."""
    parts.log_interval = log_interval
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine_pass(parts, batches, tracker)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def end_to_end(args: argparse.Namespace, tracker: Tracker) -> dict[str, Any]:
    loader = build_train_loader(args.shards, batch_size=args.batch, img_size=args.img_size, seed=0, epoch=0,
                                workers=args.workers)
    model = make_model(args.models[-1], 10, args.img_size, args.channels_last)
    parts = make_parts(model, args.log_interval, args.device, args.precision,
                       args.channels_last)
    train_one_epoch(parts, loader, epoch=0, global_step=0, tracker=tracker, save=lambda *a: None, stop=NO_STOP)  # warm-up
    runs = []
    for epoch in range(1, args.repeats + 1):
        loader.set_epoch(epoch)
        runs.append(train_one_epoch(parts, loader, epoch=epoch, global_step=0, tracker=tracker,
                                    save=lambda *a: None, stop=NO_STOP)["images_per_s"])
    return {"model": args.models[-1], "workers": args.workers, "batch": args.batch,
            "images_per_epoch": loader.batches_per_epoch * args.batch, "images_per_s": statistics.median(runs)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrnet_cls.bench train", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["trivial", "hrnet_tiny_c"], help="timm names or 'trivial'")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--img-size", type=int, default=32, help="input side, pixels")
    p.add_argument("--steps", type=int, default=40, help="steps per timed pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes of each loop (median reported)")
    p.add_argument("--log-interval", type=int, default=10, help="steps between log lines in the engine")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="fp32", help="autocast dtype (fp32 = off)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--shards", default=DIGITS, help="training shards for the end-to-end pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the end-to-end pass")
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end pass")
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tracker = Tracker(Config(), "unused", is_main=False)  # a non-main rank's: writes nothing
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": args.device, "precision": args.precision,
        "overhead": [overhead(name, args, tracker) for name in args.models],
    }
    if not args.no_e2e:
        result["end_to_end"] = end_to_end(args, tracker)
    for row in result["overhead"]:
        print(f"{row['model']:>14}: bare {1e3 * row['bare_s_per_step']:.3f} ms/step, train_one_epoch "
              f"{1e3 * row['engine_s_per_step']:.3f} ms/step, overhead {row['overhead_us_per_step']:+.0f} us/step; "
              f"host reads per step {row['host_reads_per_step']:.2f} ({row['host_reads_log_every_epoch']} in "
              f"{row['steps']} steps logging once, {row['host_reads_log_every_step']} logging every step)"
              + (f", CUDA syncs {row['cuda_sync_warnings']}" if "cuda_sync_warnings" in row else ""))
    if "end_to_end" in result:
        e = result["end_to_end"]
        print(f"end to end ({e['model']}, real loader, {e['workers']} workers, batch {e['batch']}): "
              f"{e['images_per_s']:.0f} images/s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
