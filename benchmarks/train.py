"""Training: the loop's overhead and host reads (fp16 + GradScaler too), end-to-end images/s, a real train.py run.

    python -m benchmarks train                                        # CPU: trivial + hrnet_tiny_c, digits
    python -m benchmarks train --parts overhead --models hrnet_w18_c --device cuda --precision fp16
    python -m benchmarks train --parts train_py --models hrnet_w18_c --img-size 224 --batch 256 --device cuda \\
        --precision bf16 --channels-last --compile --train-steps 300 --shards 'DIR/train-*.tar'

overhead: in-memory batches through a bare loop and through engine.train_one_epoch (``trivial``, one
linear layer, shows the loop's own cost); host reads (item, tolist, ...: a sync each on a GPU) and on
CUDA set_sync_debug_mode's syncs per step, from epochs of --steps // 2 and --steps steps (the epoch
end's reads cancel); fp16 runs the GradScaler, on a CPU too. train_py: train.py for ~--train-steps
steps on --shards, a child process (wall clock): images/s from summary.csv (the median of the epochs
after the first, which holds a compile) and from the log lines: the real loader and workers included.
"""
import argparse
import csv
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from hrnet_cls import MODEL_CFGS  # importing hrnet_cls registers the models
from hrnet_cls.config import Config
from hrnet_cls.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, expand_urls, read_info, shard_lengths
from hrnet_cls.data.transforms import Normalize
from hrnet_cls.distributed import DistInfo
from hrnet_cls.train.engine import TrainParts, build_parts, train_one_epoch
from hrnet_cls.precision import Precision
from hrnet_cls.train.preemption import StopRequest
from hrnet_cls.train.checkpointer import SUMMARY, Checkpointer
from hrnet_cls.timing import HostReads
from hrnet_cls.train.tracking import Tracker

from benchmarks import harness

DIGITS = str(harness.REPO / "shards" / "digits" / "train-{000000..000007}.tar")
LOG_LINE = re.compile(r"epoch (\d+)/\d+\s+batch \d+/\d+\s+step (\d+).*?\s(\d+) img/s")
PARTS = ("overhead", "train_py")
SMOKE = dict(batch=16, steps=4, workers=1, train_steps=16, shards=DIGITS.replace("000007", "000000"))  # 180 images


def options() -> argparse.ArgumentParser:
    p = harness.parser("train", __doc__)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--models", nargs="+", default=["trivial", "hrnet_tiny_c"], help="timm names or 'trivial'")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--img-size", type=int, default=32, help="input side, pixels")
    p.add_argument("--steps", type=int, default=40, help="steps per overhead pass (the host-read epochs: half, all)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="train.py's train.compile")
    p.add_argument("--shards", default=DIGITS, help="train_py's shards, for training and the final validation")
    p.add_argument("--workers", type=int, default=2, help="train_py's DataLoader workers")
    p.add_argument("--train-steps", type=int, default=66, help="train_py: about this many optimizer steps")
    p.add_argument("--time-limit", type=float, default=600.0, help="train_py: seconds before it is killed")
    return p


class Batches(list):
    """In-memory batches with the TrainLoader interface train_one_epoch uses."""

    batches_per_epoch = property(len)
    normalize = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)  # uint8 -> float32 on the device, as the loader's

    def progress(self, batch: int) -> tuple[float, float]:
        return batch / len(self), (batch + 1) / len(self)


def make_parts(name: str, args: argparse.Namespace) -> TrainParts:
    """TrainParts as train.py builds them (one process, no EMA, no mid-epoch saves, a log line only at
    the epoch end), the precision constructed, not resolved: fp16 runs on a CPU too."""
    torch.manual_seed(0)
    if name == "trivial":  # the loop's own cost dominates a step of this
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * args.img_size ** 2, 10))
    else:
        model = timm.create_model(name, num_classes=10, **({"channels_last": args.channels_last}
                                                           if name in MODEL_CFGS else {}))
    cfg, device = Config(), torch.device(args.device)
    cfg.optim.lr, cfg.schedule.decay_epochs, cfg.schedule.epochs = 0.01, [], 1
    cfg.train.log_interval, cfg.train.channels_last = 10 ** 9, args.channels_last
    net = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    return build_parts(cfg, DistInfo(0, 0, 1, device, True), net, Precision(args.precision, device.type))


NO_TRACKER = Tracker(Config().wandb, Checkpointer(Config().checkpoint, is_main=False))  # writes nothing


def epoch(parts: TrainParts, loader: Any) -> Any:
    return train_one_epoch(parts, loader, epoch=0, global_step=0, tracker=NO_TRACKER,
                           checkpointer=None, stop=StopRequest())


def bare_pass(parts: TrainParts, batches: Batches) -> None:
    for images, targets, *_ in batches:
        images = batches.normalize(images.to(parts.device, non_blocking=True), parts.memory_format)
        with parts.autocast:
            loss = parts.criterion(parts.model(images), targets.to(parts.device, non_blocking=True))
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()


def cuda_syncs(parts: TrainParts, batches: Batches) -> int:
    """Synchronising CUDA calls in one epoch, as torch's sync debug mode reports them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epoch(parts, batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def overhead(name: str, args: argparse.Namespace) -> dict[str, Any]:
    device, n2 = torch.device(args.device), max(args.steps, 2)
    n1 = n2 // 2
    data = [(torch.randint(0, 256, (args.batch, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device),
             torch.randint(0, 10, (args.batch,), device=device), 0, np.arange(args.batch)) for _ in range(n2)]
    batches, parts = {n: Batches(data[:n]) for n in (n1, n2)}, make_parts(name, args)
    timed = harness.measure({"bare": lambda: bare_pass(parts, batches[n2]),
                             "engine": lambda: epoch(parts, batches[n2])}, args)
    if "error" in timed["bare"] or "error" in timed["engine"]:
        raise RuntimeError(timed["bare"].get("error") or timed["engine"]["error"])
    reads, syncs = {}, {}
    for n in (n1, n2):
        with HostReads() as counter:
            summary = epoch(parts, batches[n])
        reads[n] = counter.count
        syncs[n] = cuda_syncs(parts, batches[n]) if device.type == "cuda" else None
    bare, engine = timed["bare"]["median_s"] / n2, timed["engine"]["median_s"] / n2
    row = {"model": name, "precision": args.precision, "scaler": parts.scaler.is_enabled(), "batch": args.batch,
           "steps": n2, "bare_ms_per_step": 1e3 * bare, "engine_ms_per_step": 1e3 * engine,
           "overhead_us_per_step": 1e6 * (engine - bare), "images_per_s": args.batch / engine,
           "host_reads_per_step": (reads[n2] - reads[n1]) / (n2 - n1), "host_reads_per_epoch": reads[n2],
           "cuda_syncs_per_step": (syncs[n2] - syncs[n1]) / (n2 - n1) if syncs[n2] is not None else None,
           "train_loss": summary.train_loss, "loss_finite": math.isfinite(summary.train_loss),
           "nonfinite_steps": summary.nonfinite,
           "final_scale": float(parts.scaler.get_scale()) if parts.scaler.is_enabled() else None}
    if not row["loss_finite"]:
        row["error"] = f"non-finite training loss {summary.train_loss}"
    return row


def train_py(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    urls = expand_urls(args.shards)
    per_epoch = max(sum(shard_lengths(urls)) // args.batch, 1)
    epochs = max(1, math.ceil(args.train_steps / per_epoch))
    overrides = [f"model.name={args.models[-1]}", f"model.num_classes={(read_info(urls) or {}).get('num_classes', 10)}",
                 f"data.train_shards={args.shards}", f"data.val_shards={args.shards}", f"data.batch_size={args.batch}",
                 f"data.val_batch_size={args.batch}", f"data.workers={args.workers}", f"data.img_size={args.img_size}",
                 f"schedule.epochs={epochs}", "schedule.decay_epochs=[]", f"train.precision={args.precision}",
                 f"train.channels_last={str(args.channels_last).lower()}", f"train.compile={str(args.compile).lower()}",
                 f"train.log_interval={max(1, per_epoch // 4)}", f"train.val_interval={epochs}", "wandb.mode=disabled",
                 f"checkpoint.output_dir={tmp / 'run'}", "checkpoint.save_interval=0", "checkpoint.resume="]
    env = os.environ | {"WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    if not args.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()  # a whole child process: the wall clock, not Timer
    with open(tmp / "train.log", "w") as log:
        child = subprocess.Popen([sys.executable, "train.py", "--config", "demo_digits.yaml", *overrides], env=env,
                                 cwd=harness.REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = child.wait(timeout=args.time_limit)
        except subprocess.TimeoutExpired:
            status = None
        finally:  # also on the gpu command's time budget: DataLoader and compile workers go with it
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    wall, text, csv_path = time.perf_counter() - start, (tmp / "train.log").read_text(errors="replace"), tmp / "run"
    summary = [r for r in csv.DictReader((csv_path / SUMMARY).open()) if r.get("images_per_s")] \
        if (csv_path / SUMMARY).is_file() else []
    rates = [float(r["images_per_s"]) for r in summary]
    logged = [int(m.group(3)) for m in LOG_LINE.finditer(text) if int(m.group(1)) > 0]  # epochs count from 0
    row = {"model": args.models[-1], "precision": args.precision, "compile": args.compile, "batch": args.batch,
           "workers": args.workers, "epochs": epochs, "epochs_done": len(rates), "exit_status": status,
           "steps_done": int(summary[-1]["step"]) if summary else 0, "wall_s": wall,
           "first_epoch_images_per_s": rates[0] if rates else None,
           "images_per_s": statistics.median(rates[1:]) if len(rates) > 1 else None,
           "log_images_per_s": statistics.median(logged) if logged else None, "epoch_images_per_s": rates}
    if status != 0:
        last = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        row["error"] = f"killed after {args.time_limit:.0f} s" if status is None else f"exit {status}: {last[0]}"
    return row


def run(args: argparse.Namespace, report: harness.Report) -> None:
    if "overhead" in args.parts:
        rows = report.section("overhead", f"train_one_epoch against a bare loop, batch {args.batch} at {args.img_size} "
                              f"px, {args.device} {args.precision}, in-memory batches",
                              per_step="(count(n2) - count(n1)) / (n2 - n1), logging at epoch ends only")
        for name in args.models:
            report.row(rows, name, lambda: overhead(name, args))
    if "train_py" in args.parts:
        rows = report.section("train_py", "End to end: train.py, a child process (its images/s, loader included)")
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            report.row(rows, "train.py", lambda: train_py(args, Path(tmp)))


def main(argv: list[str]) -> int:
    return harness.cli("train", options(), run, argv, SMOKE)
