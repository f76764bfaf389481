"""Sections 1 and 2: train-step speed, memory and FLOP utilisation; gradient checkpointing.

The step is bench/models.py's Runner (forward under autocast, cross-entropy, backward,
Nesterov SGD), timed one row after another (each row is one model and setting), median of
``iters`` steps after ``warmup`` untimed ones; peak memory is bench/models.py's
peak_memory_bytes (the CUDA allocator's peak above what was allocated before the step).
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import hrnet_cls  # noqa: F401  (registers the models)
from hrnet_cls.bench.gpu.common import MIB, Context, run_rows, synthetic_batch
from hrnet_cls.bench.models import Runner, peak_memory_bytes
from hrnet_cls.flops import count_macs

# row key, Profile attribute of the model, timm's implementation?, compiled?
STEP_ROWS = (
    ("timm_w18", "timm_w18", True, False),
    ("ours_w18_eager", "w18", False, False),
    ("ours_w18_compile", "w18", False, True),
    ("ours_w44_eager", "w44", False, False),
    ("ours_w44_compile", "w44", False, True),
    ("ours_w48_eager", "w48", False, False),
    ("ours_w48_compile", "w48", False, True),
)
CKPT_ROWS = (("ours_w18", "w18"), ("ours_w48", "w48"))


def make_runner(ctx: Context, name: str, model: torch.nn.Module, channels_last: bool, compiled: bool) -> Runner:
    """bench/models.py's train step for one model; compiled with the profile's backend."""
    settings = argparse.Namespace(device=str(ctx.device), channels_last=channels_last, compile=False,
                                  precision=ctx.p.precision)
    runner = Runner(name, model, settings)
    if compiled:
        runner.step_fn = torch.compile(runner._step, backend=ctx.p.compile_backend)
    return runner


def time_step(ctx: Context, name: str, is_timm: bool, compiled: bool) -> dict:
    """One row of section 1: images/s, peak memory, MACs and MFU of ``name``'s train step."""
    torch.manual_seed(0)
    channels_last = not is_timm  # timm's as its train.py runs by default (NCHW); ours NHWC
    runner = make_runner(ctx, name, timm.create_model(name), channels_last, compiled)
    macs = count_macs(runner.model, (3, ctx.p.img_size, ctx.p.img_size))
    x, y = synthetic_batch(ctx, ctx.p.batch, channels_last)
    start = time.perf_counter()
    runner.step(x, y, timed=False)  # cuDNN autotuning; the compile, when compiled
    first = time.perf_counter() - start
    for i in range(ctx.p.warmup - 1 + ctx.p.iters):
        runner.step(x, y, timed=i >= ctx.p.warmup - 1)
    step_s = statistics.median(runner.times)
    images_per_s = ctx.p.batch / step_s
    return {
        "model": name, "impl": "timm" if is_timm else "ours", "layout": "NHWC" if channels_last else "NCHW",
        "precision": ctx.p.precision, "compile": ctx.p.compile_backend if compiled else None,
        "batch": ctx.p.batch, "img_size": ctx.p.img_size, "first_step_s": first, "step_s": step_s,
        "all_step_s": runner.times, "images_per_s": images_per_s,
        "peak_mem_mib": peak_memory_bytes(runner, x, y) / MIB, "gmacs_per_image": macs / 1e9,
        "mfu": ctx.mfu(images_per_s, macs),
    }


def train_step_section(ctx: Context, out: dict) -> None:
    """Eager rows first, then the compiled ones (w18 first: sections 5 and 6 compare with it)."""
    peak, source = ctx.peak_flops()
    out["settings"] = {"batch": ctx.p.batch, "img_size": ctx.p.img_size, "precision": ctx.p.precision,
                       "warmup": ctx.p.warmup, "iters": ctx.p.iters, "compile_backend": ctx.p.compile_backend,
                       "peak_flops": peak, "peak_source": source,
                       "mfu": "images/s x 3 x 2 x MACs per image / peak dense bf16 FLOP/s"}
    rows = out["rows"] = {key: {"error": "not run"} for key, *_ in STEP_ROWS}
    order = [r for r in STEP_ROWS if not r[3]] + [r for r in STEP_ROWS if r[3]]
    for key, attr, is_timm, compiled in order:
        name = getattr(ctx.p, attr)
        run_rows(ctx, rows, (key,), lambda: {key: time_step(ctx, name, is_timm, compiled)},
                 need_s=ctx.p.compile_estimate_s if compiled else 0.0)
    base = rows["timm_w18"].get("images_per_s")
    for row in rows.values():
        if base and "images_per_s" in row:
            row["speed_vs_timm"] = row["images_per_s"] / base


def compare_checkpointing(ctx: Context, name: str) -> dict:
    """Ours eager with and without gradient checkpointing, steps interleaved (A B A B ...)."""
    runners = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(name)
        model.set_grad_checkpointing(ckpt)
        runners.append(make_runner(ctx, name, model, True, False))
    x, y = synthetic_batch(ctx, ctx.p.batch, True)
    for i in range(ctx.p.warmup + ctx.p.iters):
        for runner in runners:
            runner.step(x, y, timed=i >= ctx.p.warmup)
    (plain, ckpt) = (statistics.median(r.times) for r in runners)
    (plain_mem, ckpt_mem) = (peak_memory_bytes(r, x, y) / MIB for r in runners)
    return {"model": name, "precision": ctx.p.precision, "layout": "NHWC", "batch": ctx.p.batch,
            "step_s": plain, "ckpt_step_s": ckpt, "time_ratio": ckpt / plain,
            "peak_mem_mib": plain_mem, "ckpt_peak_mem_mib": ckpt_mem,
            "mem_ratio": ckpt_mem / plain_mem if plain_mem else None}


def grad_ckpt_section(ctx: Context, out: dict) -> None:
    out["settings"] = {"batch": ctx.p.batch, "img_size": ctx.p.img_size, "precision": ctx.p.precision,
                       "compile": None, "note": "eager, NHWC; ratio = with / without checkpointing"}
    rows = out["rows"] = {key: {"error": "not run"} for key, _ in CKPT_ROWS}
    for key, attr in CKPT_ROWS:
        name = getattr(ctx.p, attr)
        run_rows(ctx, rows, (key,), lambda: {key: compare_checkpointing(ctx, name)})
