"""Section 6: a short real train.py run on the synthetic shards, end-to-end images/s.

``python train.py --config demo_digits.yaml`` with dotted overrides (model, shards, batch,
precision, channels_last, compile, W&B disabled, a fresh output_dir, no mid-epoch saves) as
a child process in its own session, killed at the section's time limit. The shards hold
``images`` JPEGs, far fewer than ``train_steps`` x batch, so the run trains several epochs
over them (``epochs`` in the result); validation runs once, after the last epoch, over the
same shards. Reported from summary.csv (``images_per_s``: training steps with the loader,
not validation or checkpoint saving): each epoch's images/s and the median over the epochs
after the first (which includes the compile); and the img/s of train.py's log lines after
the first epoch, which also cover a run cut short by the time limit.
"""
from __future__ import annotations

import csv
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time

from hrnet_cls.bench.gpu.common import REPO, Context, run_rows

LOG_LINE = re.compile(r"epoch (\d+)/\d+\s+batch \d+/\d+\s+step (\d+).*?\s(\d+) img/s")


def overrides(ctx: Context, epochs: int) -> list[str]:
    p = ctx.p
    return [
        f"model.name={p.train_model}", "model.num_classes=8", f"data.train_shards={ctx.shards.brace()}",
        f"data.val_shards={ctx.shards.brace()}", f"data.batch_size={p.train_batch}",
        f"data.val_batch_size={p.val_batch}", f"data.workers={ctx.workers}", f"data.img_size={p.img_size}",
        "data.crop_pct=0.875", f"schedule.epochs={epochs}", "schedule.decay_epochs=[]", "optim.lr=0.1",
        f"train.precision={p.precision}", "train.channels_last=true", f"train.compile={str(p.train_compile).lower()}",
        f"train.log_interval={p.train_log_interval}", f"train.val_interval={epochs}", "wandb.mode=disabled",
        f"checkpoint.output_dir={ctx.tmp / 'train_run'}", "checkpoint.save_interval=0", "checkpoint.keep=1",
        "checkpoint.resume=",
    ]


def run_child(ctx: Context, command: list[str], log_path, timeout: float) -> tuple[int | None, float]:
    """(exit status or None when killed at the timeout, seconds); the child's whole session dies with it."""
    env = os.environ | {"WANDB_MODE": "disabled", "WANDB_SILENT": "true",
                        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if not ctx.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run stays on the CPU
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            status = child.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            status = None
        finally:  # also on SectionTimeout: DataLoader workers and compile workers go with it
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    return status, time.perf_counter() - start


def read_summary(path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("images_per_s")]


def train_py(ctx: Context) -> dict:
    p = ctx.p
    per_epoch = ctx.shards.images // p.train_batch
    epochs = max(1, math.ceil(p.train_steps / per_epoch))
    command = [sys.executable, "train.py", "--config", "demo_digits.yaml", *overrides(ctx, epochs)]
    log_path = ctx.tmp / "train_py.log"
    status, wall = run_child(ctx, command, log_path, ctx.left() - 5)
    text = log_path.read_text(errors="replace")
    summary = read_summary(ctx.tmp / "train_run" / "summary.csv")
    rates = [float(r["images_per_s"]) for r in summary]
    logged = [int(m.group(3)) for m in LOG_LINE.finditer(text) if int(m.group(1)) > 0]
    row = {"model": p.train_model, "batch": p.train_batch, "img_size": p.img_size, "precision": p.precision,
           "compile": p.train_compile, "workers": ctx.workers, "shard_images": ctx.shards.images,
           "steps_per_epoch": per_epoch, "epochs": epochs, "epochs_done": len(rates),
           "steps_done": int(summary[-1]["step"]) if summary else 0, "exit_status": status, "wall_s": wall,
           "epoch_images_per_s": rates, "first_epoch_images_per_s": rates[0] if rates else None,
           "images_per_s": statistics.median(rates[1:]) if len(rates) > 1 else None,
           "log_images_per_s": statistics.median(logged) if logged else None,
           "command": " ".join(command[1:])}
    if status is None:
        row["note"] = f"stopped at the section's time limit after {len(rates)} of {epochs} epochs"
    elif status != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        row["error"] = f"train.py exited {status}: {lines[-1] if lines else '(no output)'}"
    if row["images_per_s"] is None and row["log_images_per_s"] is None and "error" not in row:
        row["error"] = f"no images/s: {len(rates)} epoch(s) and no log line after the first epoch ({row.get('note')})"
    return row


def train_py_section(ctx: Context, out: dict) -> None:
    out["settings"] = {"config": "demo_digits.yaml + overrides", "steps_target": ctx.p.train_steps,
                       "note": "the shards are reused for several epochs and for the final validation"}
    rows = out["rows"] = {"train_py": {"error": "not run"}}
    run_rows(ctx, rows, ("train_py",), lambda: {"train_py": train_py(ctx)})
