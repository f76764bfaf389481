"""What verified checkpoints cost: save with and without the streamed sha256, verify, load.

    python -m hrnet_cls.bench checkpoint                        # hrnet_w18_c training state, a temp dir
    python -m hrnet_cls.bench checkpoint --model hrnet_w48_c --dir /shared/scratch --out ckpt.json

The state is what train.py saves: model, EMA and SGD momentum (3 copies of the weights).
Timed, median of --repeats, interleaved: plain ``torch.save`` to a file; our
``save_checkpoint`` (temp file, sha256 while writing, fsync, rename, .sha256 beside it);
``verify`` (re-read + sha256, what resume=auto pays per candidate); a full ``torch.load``
(the other way to check a file, which does not see a flipped byte inside a tensor); the
memory-mapped load resume=auto uses to read a candidate's step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import timm
import torch

import hrnet_cls  # noqa: F401  (registers the models)
from hrnet_cls.atomic import verify
from hrnet_cls.bench.data import machine
from hrnet_cls.checkpoint import build_state, load_checkpoint, save_checkpoint


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hrnet_cls.bench checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="hrnet_w18_c")
    p.add_argument("--dir", default="", help="where to write (default: a temp dir); put it on the file system you train on")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p.parse_args(argv)


def training_state(name: str) -> dict:
    model = timm.create_model(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers exist, as in a real checkpoint
    return build_state(model=model, optimizer=optimizer, epoch=1, step=1, batch_in_epoch=0, config={},
                       model_ema=timm.create_model(name))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def plain_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    state = training_state(args.model)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        plain, ours = Path(tmp) / "plain.pth", Path(tmp) / "last.pth"
        ways = {
            "torch.save + fsync": lambda: plain_save(state, plain),
            "save_checkpoint (sha256 while writing)": lambda: save_checkpoint(ours, state),
            "verify (read + sha256)": lambda: verify(ours),
            "torch.load, full": lambda: torch.load(ours, map_location="cpu", weights_only=True),
            "load_checkpoint, mmap (the step only)": lambda: load_checkpoint(ours, mmap=True)["step"],
        }
        runs: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                runs[name].append(timed(fn))
        size = ours.stat().st_size
    results = {name: {"seconds": statistics.median(t), "mb_per_s": size / 2**20 / statistics.median(t)}
               for name, t in runs.items()}
    print(f"{args.model} training state: {size / 2**20:.0f} MiB, median of {args.repeats}")
    for name, row in results.items():
        print(f"  {name:<42} {row['seconds']:7.3f} s  {row['mb_per_s']:8.0f} MiB/s")
    base = results["torch.save + fsync"]["seconds"]
    print(f"checksum cost at save: {results['save_checkpoint (sha256 while writing)']['seconds'] / base - 1:+.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "model": args.model, "bytes": size,
                                              "results": results}, indent=1) + "\n")
    return 0
