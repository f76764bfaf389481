"""Section 3: fp16 with GradScaler through the training engine, and its host syncs per step.

The step is hrnet_cls.engine.train_one_epoch over in-memory batches, with the TrainParts of
bench/train.py's make_parts (as train.py builds them) switched to fp16. Per-step counts come
from two epochs of different lengths (n1, n2 steps), logging only at the epoch end:
(count(n2) - count(n1)) / (n2 - n1), so the epoch summary's own reads cancel. Counted:
tensor values read by Python (bench/train.py's HostReads: item, tolist, ...) and, on CUDA,
the synchronising calls torch.cuda.set_sync_debug_mode("warn") reports (bench/train.py's
cuda_syncs). On a CPU (the smoke run) fp16 autocast and an enabled GradScaler run too
(Precision is constructed, not resolved, which would refuse fp16 off CUDA).
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import timm
import torch

from hrnet_cls.bench.gpu.common import Context, run_rows, synthetic_batch
from hrnet_cls.bench.train import NO_STOP, Batches, HostReads, cuda_syncs, make_parts
from hrnet_cls.config import Config
from hrnet_cls.engine import TrainParts, train_one_epoch
from hrnet_cls.precision import Precision
from hrnet_cls.timing import synchronize
from hrnet_cls.tracking import Tracker

NO_LOG = 10 ** 9  # log_interval: no log line inside an epoch, only its summary


def fp16_parts(ctx: Context, name: str) -> TrainParts:
    torch.manual_seed(0)
    parts = make_parts(timm.create_model(name), NO_LOG, str(ctx.device), "fp32", channels_last=True)
    fp16 = Precision("fp16", ctx.device.type)  # what Precision.of("fp16", "cuda") gives, on a CPU too
    return dataclasses.replace(parts, precision=fp16, scaler=fp16.grad_scaler(), autocast=fp16.autocast(),
                               halt_on_nonfinite=False)  # as build_parts sets it for an enabled scaler


def fp16_run(ctx: Context, name: str) -> dict:
    parts = fp16_parts(ctx, name)
    tracker = Tracker(Config(), "unused", is_main=False)  # a non-main rank's: writes nothing
    x, y = synthetic_batch(ctx, ctx.p.batch, True)
    batches = {n: Batches([(x, y, 0, np.arange(ctx.p.batch))] * n) for n in ctx.p.fp16_steps}
    n1, n2 = ctx.p.fp16_steps

    def epoch(n: int) -> dict:
        return train_one_epoch(parts, batches[n], epoch=0, global_step=0, tracker=tracker,
                               save=lambda *a: None, stop=NO_STOP)
    epoch(n1)  # warm-up: cuDNN autotuning, the scaler's first overflow-skipped steps
    start = time.perf_counter()
    summary = epoch(n2)
    synchronize(ctx.device)
    step_s = (time.perf_counter() - start) / n2
    reads = {}
    for n in (n1, n2):
        with HostReads() as counter:
            epoch(n)
        reads[n] = counter.count
    row = {"model": name, "precision": parts.precision.name, "scaler": parts.scaler.is_enabled(),
           "batch": ctx.p.batch, "layout": "NHWC", "steps": n2, "step_s": step_s,
           "images_per_s": ctx.p.batch / step_s, "train_loss": summary["train_loss"],
           "loss_finite": math.isfinite(summary["train_loss"]), "nonfinite_steps": summary["nonfinite"],
           "final_scale": float(parts.scaler.get_scale()), "host_reads_per_step": (reads[n2] - reads[n1]) / (n2 - n1),
           "host_reads_per_epoch": {str(n): c for n, c in reads.items()}, "cuda_syncs_per_step": None}
    if ctx.cuda:
        syncs = {n: cuda_syncs(parts, batches[n], tracker, NO_LOG) for n in (n1, n2)}
        row["cuda_syncs_per_step"] = (syncs[n2] - syncs[n1]) / (n2 - n1)
        row["cuda_syncs_per_epoch"] = {str(n): c for n, c in syncs.items()}
    else:
        row["note"] = "CPU: host reads (HostReads) counted; CUDA sync warnings need a GPU"
    if not row["loss_finite"]:
        row["error"] = f"non-finite training loss {summary['train_loss']}"
    return row


def fp16_section(ctx: Context, out: dict) -> None:
    out["settings"] = {"batch": ctx.p.batch, "img_size": ctx.p.img_size, "steps": list(ctx.p.fp16_steps),
                       "per_step": "(count(n2) - count(n1)) / (n2 - n1), logging at epoch ends only"}
    rows = out["rows"] = {"ours_w18_fp16": {"error": "not run"}}
    run_rows(ctx, rows, ("ours_w18_fp16",), lambda: {"ours_w18_fp16": fp16_run(ctx, ctx.p.w18)})
