"""What verified checkpoints cost: save with and without the streamed sha256, verify, load.

    python -m benchmarks checkpoint                                    # hrnet_w18_c training state, a temp dir
    python -m benchmarks checkpoint --model hrnet_w48_c --dir /shared/scratch --out results

The state is what train.py saves (model, EMA, SGD momentum). Timed: torch.save + fsync; save_checkpoint
(temp file, sha256 while writing, fsync, rename, .sha256); verify (re-read + sha256, what resume=auto
pays per candidate); a full torch.load (blind to a flipped byte in a tensor); the mmap load of the step.
Then what the training loop pays per save through Checkpointer.write: synchronous (the whole write), and
asynchronous (checkpoint.async_save): the loop's stall (the host snapshot) and the write the
background thread does meanwhile, each save after the previous one finished.
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import hrnet_cls  # noqa: F401  (registers the models)
from hrnet_cls.atomic import verify
from hrnet_cls.train.state import Position, build_state, load_checkpoint, save_checkpoint
from hrnet_cls.config import CheckpointConfig
from hrnet_cls.train.checkpointer import Checkpointer

from benchmarks import harness

SMOKE = dict(model="hrnet_tiny_c")


def options() -> argparse.ArgumentParser:
    p = harness.parser("checkpoint", __doc__)
    p.add_argument("--model", default="hrnet_w18_c")
    p.add_argument("--dir", default="", help="where to write (default: a temp dir); the file system you train on")
    return p


def plain_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def run(args: argparse.Namespace, report: harness.Report) -> None:
    out = report.section(f"checkpoint {args.model}",
                         f"Verified checkpoints: {args.model} training state (model, EMA, momentum) on {args.device}")
    report.row(out, "checkpoint", lambda: rows(args), many=True)


def rows(args: argparse.Namespace) -> dict[str, dict]:
    model = timm.create_model(args.model).to(args.device)  # on a GPU the snapshot copies into pinned memory
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers exist, as in a real checkpoint
    state = build_state(model=model, optimizer=optimizer, position=Position(1, 1), config={},
                        model_ema=timm.create_model(args.model).to(args.device))
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        plain, ours = Path(tmp) / "plain.pth", Path(tmp) / "last.pth"
        save_checkpoint(ours, state)  # the readers' file exists before their first call
        timed = harness.measure({
            "torch.save + fsync": lambda: plain_save(state, plain),
            "save_checkpoint (sha256 while writing)": lambda: save_checkpoint(ours, state),
            "verify (read + sha256)": lambda: verify(ours),
            "torch.load, full": lambda: torch.load(ours, map_location="cpu", weights_only=True),
            "load_checkpoint, mmap (the step only)": lambda: load_checkpoint(ours, mmap=True)["step"],
            "Checkpointer.write, sync: the loop waits for the write": lambda: folder(tmp, False).write(state, False)},
            args)
        timed.update(background(state, Path(tmp) / "async", 3 * args.rounds))
        mib = ours.stat().st_size / harness.MIB
    base = timed["torch.save + fsync"].get("median_s")
    return {name: harness.timed_row(t, model=args.model, mib=mib, mib_per_s=harness.ratio(mib, t.get("median_s")),
                                    vs_torch_save=harness.ratio(t.get("median_s"), base)) for name, t in timed.items()}


def folder(path: str | Path, async_save: bool) -> Checkpointer:
    return Checkpointer(CheckpointConfig(output_dir=str(path), async_save=async_save))


def background(state: dict, path: Path, saves: int) -> dict[str, dict]:
    """The loop's stall and the thread's write time of ``saves`` asynchronous saves, one at a time."""
    run, stalls, writes = folder(path, True), [], []
    path.mkdir()
    for _ in range(saves):
        written = run.writer.write_s
        began = time.perf_counter()
        run.write(state, epoch_end=False)
        stalls.append(time.perf_counter() - began)
        run.finish()
        writes.append(run.writer.write_s - written)
    pooled = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "n": len(t)}
              for name, t in (("stall", stalls), ("write", writes))}
    return {"Checkpointer.write, async: the loop's stall (snapshot)": pooled["stall"],
            "Checkpointer.write, async: the background write": pooled["write"]}


def main(argv: list[str]) -> int:
    return harness.cli("checkpoint", options(), run, argv, SMOKE)
