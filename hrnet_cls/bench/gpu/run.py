"""The command: arguments, the synthetic shards, the sections in order under their budgets, JSON and markdown."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from hrnet_cls.bench.gpu.common import (FULL, Context, Profile, SectionTimeout, environment, log, smoke_profile,
                                        time_limit)
from hrnet_cls.bench.gpu.fp16 import fp16_section
from hrnet_cls.bench.gpu.infer import validation_section
from hrnet_cls.bench.gpu.pipeline import input_pipeline_section, write_shards
from hrnet_cls.bench.gpu.step import grad_ckpt_section, train_step_section
from hrnet_cls.bench.gpu.trainrun import train_py_section
from hrnet_cls.data.workers import usable_cores
from hrnet_cls.errors import one_line

# number -> (result key, title, function, columns of the markdown table)
SECTIONS: dict[int, tuple[str, str, Callable[[Context, dict], None], tuple[str, ...]]] = {
    1: ("train_step", "Train step (synthetic batch)", train_step_section,
        ("model", "impl", "layout", "precision", "compile", "batch", "images_per_s", "speed_vs_timm", "peak_mem_mib",
         "gmacs_per_image", "mfu", "first_step_s")),
    2: ("grad_ckpt", "Gradient checkpointing", grad_ckpt_section,
        ("model", "batch", "step_s", "ckpt_step_s", "time_ratio", "peak_mem_mib", "ckpt_peak_mem_mib", "mem_ratio")),
    3: ("fp16", "fp16 + GradScaler through the training engine", fp16_section,
        ("model", "batch", "images_per_s", "train_loss", "loss_finite", "nonfinite_steps", "final_scale",
         "host_reads_per_step", "cuda_syncs_per_step")),
    4: ("validation", "Validation", validation_section,
        ("model", "setting", "precision", "batch", "images_per_s", "vs_timm", "batch_s")),
    5: ("input_pipeline", "Input pipeline against the train step", input_pipeline_section,
        ("source", "workers", "device", "batch", "output", "images_per_s", "steady_images_per_s", "vs_demand")),
    6: ("train_py", "train.py end to end", train_py_section,
        ("model", "precision", "compile", "batch", "workers", "epochs_done", "steps_done", "images_per_s",
         "log_images_per_s", "first_epoch_images_per_s", "exit_status", "wall_s")),
}
NEEDS_SHARDS = {4, 5, 6}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrnet_cls.bench gpu", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (under 3 minutes): the code path only")
    p.add_argument("--device", default="", help="default: cuda, or cpu with --smoke")
    p.add_argument("--out", default="bench-gpu", help="folder for gpu.json and gpu.md (created)")
    p.add_argument("--sections", default=",".join(map(str, SECTIONS)), help="comma-separated section numbers")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = every usable core)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="dense bf16 peak for MFU when the GPU is not in the table")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds for the whole command (default: profile)")
    return p.parse_args(argv)


def selected(text: str) -> list[int]:
    try:
        numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"error: --sections {text!r}: expected comma-separated numbers from {list(SECTIONS)}")
    unknown = [n for n in numbers if n not in SECTIONS]
    if unknown or not numbers:
        raise SystemExit(f"error: --sections {text!r}: no section {unknown or text}; there are {list(SECTIONS)}")
    return numbers


def fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "/")


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# bench gpu{' --smoke' if result['smoke'] else ''}", "",
             f"`{env['command']}` on {env['gpu'] or env['processor']} ({env['device']}), torch {env['torch']}, "
             f"CUDA {env['cuda']}, timm {env['timm']}, {env['cores_usable']} cores, {env['date']}; "
             f"{result['seconds']:.0f} s in all.", ""]
    for number in result["sections_run"]:
        key, title, _, columns = SECTIONS[number]
        if key not in result["sections"]:  # not reached yet (the file is rewritten after each section)
            continue
        section = result["sections"][key]
        lines += [f"## {number}. {title}", ""]
        if section.get("error"):
            lines += [f"Section error: {section['error']}", ""]
        rows = section.get("rows", {})
        if rows:
            shown = [c for c in columns if any(c in row for row in rows.values())]
            lines.append("| row | " + " | ".join(shown) + " | error |")
            lines.append("|---" * (len(shown) + 2) + "|")
            for name, row in rows.items():
                lines.append(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in shown)
                             + f" | {fmt(row.get('error'))} |")
            lines.append("")
        for name, value in section.get("settings", {}).items():
            lines.append(f"- {name}: {fmt(value)}")
        lines.append("")
    return "\n".join(lines)


def errors(result: dict) -> list[str]:
    found = []
    for key, section in result["sections"].items():
        if section.get("error"):
            found.append(f"{key}: {section['error']}")
        for name, row in section.get("rows", {}).items():
            if row.get("error"):
                found.append(f"{key}/{name}: {row['error']}")
    return found


def write(result: dict, out: Path) -> None:
    (out / "gpu.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(result))


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    numbers = selected(args.sections)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (torch.cuda.is_available() is False); run with --smoke for the CPU check",
              file=sys.stderr)
        return 2
    p: Profile = smoke_profile() if args.smoke else FULL
    if args.time_limit:
        p = dataclasses.replace(p, time_limit_s=args.time_limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    elif args.smoke:  # the code path, not speed: one thread cannot spin-wait against a busy machine's other work
        torch.set_num_threads(1)
    end = start + p.time_limit_s
    result = {"smoke": args.smoke, "profile": dataclasses.asdict(p), "environment": environment(device, argv),
              "sections_run": numbers, "sections": {}, "seconds": 0.0}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        ctx = Context(args, p, device, Path(tmp), args.workers or usable_cores())
        if NEEDS_SHARDS & set(numbers):
            ctx.shards = write_shards(Path(tmp), p.images, p.unique_images, ctx.workers)
            result["shards"] = {"images": ctx.shards.images, "unique": p.unique_images,
                                "mean_jpeg_kb": ctx.shards.mean_bytes / 1024, "seconds": ctx.shards.seconds}
            log(f"shards: {ctx.shards.images} JPEGs, mean {ctx.shards.mean_bytes / 1024:.0f} KB, "
                f"{ctx.shards.seconds:.1f} s")
        for number in numbers:
            key, title, run, _ = SECTIONS[number]
            section = ctx.results[key] = result["sections"][key] = {}
            ctx.deadline = min(time.perf_counter() + p.budgets[number], end)
            log(f"section {number}: {title} ({ctx.left():.0f} s)")
            section_start = time.perf_counter()
            try:
                with time_limit(ctx.left()):
                    run(ctx, section)
            except SectionTimeout as e:
                section["error"] = str(e)
            except Exception as e:  # noqa: BLE001 - a broken section is its result; the others still run
                section["error"] = one_line(e)
            section["seconds"] = time.perf_counter() - section_start
            result["seconds"] = time.perf_counter() - start
            write(result, out)
    result["seconds"] = time.perf_counter() - start
    write(result, out)
    found = errors(result)
    log(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}: {len(found)} row(s) with errors, "
        f"{result['seconds']:.0f} s")
    for line in found:
        print(f"  {line}", file=sys.stderr)
    return 1 if found else 0
