"""Section 4: validation images/s, ours (BatchNorm folded, compiled, NHWC) against timm's eager model.

Model throughput: the same in-memory batch of ``val_batch`` random images, forward under
inference_mode and autocast, median of ``iters`` batches. timm's side is what its
validate.py runs with ``--amp``: no folding, NCHW, autocast, eager. Ours folds on the CPU
first (as hrnet_cls.validation does, checked on a 64 px batch), then moves to the device
in NHWC and compiles.

End to end (if the section's time allows): bench/validate.py's run_ours / run_timm, the
calls of our validate.py and of timm's, over the synthetic shards (``images`` JPEGs at
500x375, every core decoding), both uncompiled: the loader dominates there, and a compile
inside each timed run would measure the compiler.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import timm
import torch

from hrnet_cls.bench.gpu.common import Context, log, run_rows
from hrnet_cls.bench.validate import make_weights, run_ours, run_timm
from hrnet_cls.data import expand_urls
from hrnet_cls.fusion import fold_batchnorm
from hrnet_cls.precision import Precision
from hrnet_cls.timing import synchronize

ROWS = ("timm_w18", "ours_w18", "e2e_timm", "e2e_ours")


def time_forward(ctx: Context, forward: Callable, x: torch.Tensor) -> dict:
    autocast = Precision.of(ctx.p.precision, ctx.device).autocast
    times = []
    with torch.inference_mode():
        for i in range(ctx.p.warmup + ctx.p.iters):
            synchronize(ctx.device)
            start = time.perf_counter()
            with autocast():
                forward(x)
            synchronize(ctx.device)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times[ctx.p.warmup:])
    return {"batch": x.shape[0], "precision": ctx.p.precision, "first_batch_s": times[0], "batch_s": step_s,
            "images_per_s": x.shape[0] / step_s}


def timm_forward(ctx: Context) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(ctx.p.timm_w18).to(ctx.device).eval()
    x = torch.randn(ctx.p.val_batch, 3, ctx.p.img_size, ctx.p.img_size, device=ctx.device)
    return {"model": ctx.p.timm_w18, "setting": "eager, NCHW, no fold (timm validate.py --amp)",
            **time_forward(ctx, model, x)}


def ours_forward(ctx: Context) -> dict:
    torch.manual_seed(0)
    model = fold_batchnorm(timm.create_model(ctx.p.w18).eval(), check=torch.randn(2, 3, 64, 64))
    folded = model.folded_batchnorms
    model = model.to(ctx.device, memory_format=torch.channels_last)
    forward = torch.compile(model, backend=ctx.p.compile_backend)
    x = torch.randn(ctx.p.val_batch, 3, ctx.p.img_size, ctx.p.img_size, device=ctx.device)
    return {"model": ctx.p.w18, "setting": f"{folded} BatchNorms folded, NHWC, compile {ctx.p.compile_backend}",
            **time_forward(ctx, forward, x.contiguous(memory_format=torch.channels_last))}


def end_to_end(ctx: Context) -> dict:
    """bench/validate.py's two runs, interleaved (ours, timm, ...), median of e2e_repeats each."""
    settings = argparse.Namespace(
        model=ctx.p.w18, timm_model=ctx.p.timm_w18, img_size=ctx.p.img_size, crop_pct=0.875,
        batch_size=ctx.p.val_batch, workers=ctx.workers, device=str(ctx.device), precision=ctx.p.precision,
        compile=False, no_fold_bn=False)
    weights = ctx.tmp / "val_weights.pth"
    make_weights(settings, weights)
    urls = expand_urls(ctx.shards.pattern)
    times: dict[str, list[float]] = {"ours": [], "timm": []}
    counts = {}
    for repeat in range(ctx.p.e2e_repeats):
        seconds, counts["ours"] = run_ours(settings, weights, urls)
        times["ours"].append(seconds)
        seconds, counts["timm"] = run_timm(settings, weights, ctx.shards.root)
        times["timm"].append(seconds)
        log(f"    end to end, run {repeat + 1}: ours {times['ours'][-1]:.1f} s, timm {times['timm'][-1]:.1f} s")
    rows = {}
    for side, setting in (("ours", "validate.py: fold, our loader"), ("timm", "timm validate.py: its loader")):
        seconds = statistics.median(times[side])
        rows[f"e2e_{side}"] = {
            "model": settings.model if side == "ours" else settings.timm_model, "batch": settings.batch_size,
            "setting": f"{setting}, {ctx.workers} workers, uncompiled, model creation included",
            "precision": ctx.p.precision, "images": ctx.shards.images, "seconds_all": times[side],
            "batch_s": None, "images_per_s": ctx.shards.images / seconds,
            "top1_top5_samples": list(counts[side])}
    return rows


def validation_section(ctx: Context, out: dict) -> None:
    out["settings"] = {"val_batch": ctx.p.val_batch, "img_size": ctx.p.img_size, "precision": ctx.p.precision,
                       "e2e_images": ctx.shards.images if ctx.shards else None}
    rows = out["rows"] = {key: {"error": "not run"} for key in ROWS}
    run_rows(ctx, rows, ("timm_w18",), lambda: {"timm_w18": timm_forward(ctx)})
    run_rows(ctx, rows, ("ours_w18",), lambda: {"ours_w18": ours_forward(ctx)}, need_s=ctx.p.compile_estimate_s)
    run_rows(ctx, rows, ("e2e_timm", "e2e_ours"), lambda: end_to_end(ctx), need_s=ctx.p.e2e_estimate_s)
    for timm_key, ours_key in (("timm_w18", "ours_w18"), ("e2e_timm", "e2e_ours")):
        base = rows[timm_key].get("images_per_s")
        for key in (timm_key, ours_key):
            if base and "images_per_s" in rows[key]:
                rows[key]["vs_timm"] = rows[key]["images_per_s"] / base
