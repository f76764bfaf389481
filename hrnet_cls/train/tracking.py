"""The run's records on the main rank: summary.csv rows and W&B (docs/design.md §4.11). The W&B mode
is decided before ``wandb.init``, with every wait bounded: online needs an API key found without a
prompt and verified by the server in time, else training goes on without W&B after one warning.
"""
from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hrnet_cls.config import WandbConfig, config_to_dict
from hrnet_cls.errors import flat
from hrnet_cls.train.checkpointer import Checkpointer

logger = logging.getLogger(__name__)

# summary.csv columns, one row per epoch; "epoch" is the 0-based index of the finished
# epoch (epoch_XXXX.pth of the same epoch holds the weights after it).
SUMMARY_COLUMNS = (
    "epoch",  # 0-based epoch index
    "step",  # global optimizer steps after the epoch
    "lr",  # learning rate during the epoch
    "train_loss",  # mean training loss over the epoch
    "val_loss",  # mean validation loss
    "val_top1",  # validation top-1 accuracy, %
    "val_top5",  # validation top-5 accuracy, %
    "epoch_time_s",  # wall time of training + validation, seconds
    "images_per_s",  # training throughput over all ranks, images per second
    "skipped",  # samples skipped by the data pipeline (unreadable images)
    "train_images",  # images trained on in the epoch, all processes (across a resume: the whole epoch)
    "checkpoint_s",  # seconds the loop waited on checkpoints since the previous row (its epoch-end save included)
    "val_samples",  # images validated; fewer than listed (bad samples left out): the row picks no best.pth
)
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_CHECK_OVERHEAD_S = 10.0  # beyond connect_timeout_s, for the check's own start (importing wandb: ~0.5 s)


# ---------------------------------------------------------------- mode decision


def _online_wandb() -> Any:
    """wandb, set up for an online run whose every wait is bounded by our timeouts."""
    import wandb

    # mode: the decision is ours (cfg / WANDB_MODE), not a `wandb offline` settings file's.
    # x_disable_viewer: unless silent, wandb.login and wandb.init ask the server for the
    # account (for their "logged in as" line and the account's code-saving default) with a
    # fixed 5 s timeout per try that no setting changes: 5 s in wandb.login, 10 s in
    # wandb.init on top of init_timeout, against a silent server.
    wandb.setup(wandb.Settings(mode="online", x_disable_viewer=True))
    return wandb


# Runs in a child process. Cancelling a wandb.Api request at its timeout can break the
# connection to the W&B service, and wandb.teardown() (also wandb's own at exit) then waits
# forever for a service that never got the message (seen with wandb 0.31 against a closed
# port, about one run in four). In a child we can bound, os._exit skips that teardown; the
# child's service exits when its parent is gone.
_CHECK = """
import os, sys
import wandb
try:
    wandb.setup(wandb.Settings(mode="online", x_disable_viewer=True))
    if not wandb.login(prompt=False, verify=False):  # env, token file, netrc or settings file; no network
        print("wandb.mode is online but no API key is configured (set WANDB_API_KEY or run `wandb login`)")
        os._exit(3)
    wandb.Api(timeout=float(sys.argv[1]))  # verifies the key with the server
except Exception as e:
    print(" ".join(str(e).split()) or type(e).__name__)
    os._exit(1)
os._exit(0)
"""


def _check_online(connect_timeout_s: float) -> str:
    """'' when wandb finds an API key and the server verifies it in time, else why not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}  # its own service
    child = subprocess.Popen([sys.executable, "-c", _CHECK, str(connect_timeout_s)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = child.communicate(timeout=connect_timeout_s + _CHECK_OVERHEAD_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return f"the server did not verify the API key within {connect_timeout_s:.0f} s"
    if child.returncode == 0:
        return ""
    reason = (out.strip().splitlines() or ["the check failed"])[-1]
    return reason if child.returncode == 3 else f"the server did not verify the API key: {reason}"


def resolve_wandb_mode(cfg: WandbConfig, connect_timeout_s: float = 3.0) -> str:
    """"online", "offline" or "disabled", decided without calling wandb.init.

    WANDB_MODE, when set, overrides cfg.mode. Online degrades to "disabled" with one
    warning when wandb finds no API key (it is never prompted for) or the server does not
    verify it within connect_timeout_s.
    """
    mode = os.environ.get("WANDB_MODE", "").strip().lower() or cfg.mode
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in ("online", "offline", "disabled"):
        logger.warning("WANDB_MODE=%r is not online/offline/disabled; using wandb.mode=%r", mode, cfg.mode)
        mode = _MODE_ALIASES.get(cfg.mode, cfg.mode)
    if mode != "online":
        return mode
    problem = _check_online(connect_timeout_s)
    if problem:
        logger.warning("W&B disabled: %s (use wandb.mode=offline to keep a local run and `wandb sync` it later)",
                       problem)
        return "disabled"
    _online_wandb()
    return "online"


# ---------------------------------------------------------------- tracker


def _number(key: str, value: Any) -> float | int:
    """Plain Python number from a float, int, 0-d tensor or numpy scalar."""
    number = value.item() if hasattr(value, "item") else value
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
    return number


def _csv_cell(value: float | int | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


class Tracker:
    """summary.csv + W&B of a run folder, on its main rank (elsewhere every method does nothing).

    start_epoch: rows of summary.csv from this epoch on are dropped (a resume redoes them).
    resuming: continue the W&B run whose id the folder holds."""

    def __init__(self, cfg: WandbConfig, run: Checkpointer, start_epoch: int = 0, resuming: bool = False,
                 connect_timeout_s: float = 3.0, init_timeout_s: float = 30.0):
        self.enabled = run.is_main
        self.run: Any = None  # the wandb Run, or None without W&B
        self.summary_path = run.summary_csv
        self._warned_extra: set[str] = set()
        if not self.enabled:
            return
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        self._start_summary(start_epoch)
        mode = resolve_wandb_mode(cfg, connect_timeout_s)
        if mode != "disabled":
            recipe = config_to_dict(run.recipe) if run.recipe is not None else {}
            self.run = _init_wandb(cfg, recipe, run.path, mode, init_timeout_s, run.wandb_run_id(resuming))

    def _start_summary(self, start_epoch: int) -> None:
        kept: list[dict[str, str]] = []
        if start_epoch > 0 and self.summary_path.is_file():
            with open(self.summary_path, newline="") as f:
                rows = csv.DictReader(f)
                kept = [r for r in rows if r.get("epoch", "").isdigit() and int(r["epoch"]) < start_epoch]
        with open(self.summary_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Per-step metrics (e.g. loss, lr, images_per_s) as train/<name> against train/step."""
        if self.run is None:
            return
        self.run.log({"train/step": step, **{f"train/{k}": _number(k, v) for k, v in metrics.items()}})

    def log_epoch(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        """One summary.csv row and epoch/<name> in W&B against epoch (0-based index).

        Keys outside SUMMARY_COLUMNS go to W&B only; missing columns stay empty.
        """
        if not self.enabled:
            return
        values = {k: _number(k, v) for k, v in metrics.items()}
        extra = set(values) - set(SUMMARY_COLUMNS) - self._warned_extra
        if extra:
            logger.debug("metrics %s are not summary.csv columns; logged to W&B only", sorted(extra))
            self._warned_extra |= extra
        row = {c: _csv_cell(values.get(c)) for c in SUMMARY_COLUMNS} | {"epoch": str(epoch)}
        with open(self.summary_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS).writerow(row)
        if self.run is not None:
            self.run.log({"epoch": epoch, **{f"epoch/{k}": v for k, v in values.items()}})

    def finish(self) -> None:
        """Close the W&B run and wait until its files are written (idempotent)."""
        if self.run is not None:
            import wandb

            run, self.run = self.run, None
            run.finish()
            # finish() can return before the W&B service has written the run file
            # (observed with 0.31 offline); teardown waits for the service to exit.
            wandb.teardown()


def _bounded_teardown(timeout_s: float = 10.0) -> None:
    """Stop this process's W&B service, waiting at most timeout_s: after a failed request the
    service may never hear the teardown and wandb.teardown() would wait forever (see _CHECK).
    A daemon thread that is still waiting does not keep the process from exiting."""
    import wandb

    thread = threading.Thread(target=wandb.teardown, name="wandb-teardown", daemon=True)
    thread.start()
    thread.join(timeout_s)


def _init_wandb(cfg: WandbConfig, recipe: dict[str, Any], output_dir: Path, mode: str, init_timeout_s: float,
                run_id: str) -> Any:
    """wandb.init of run ``run_id`` (continued if it exists) in an already-decided mode; on
    failure warn once and return None."""
    import wandb

    if mode == "online":
        _online_wandb()
    name = cfg.name or f"{recipe.get('model', {}).get('name', 'hrnet')}-{output_dir.resolve().name}"
    started = time.monotonic()
    try:
        run = wandb.init(
            project=cfg.project, entity=cfg.entity or None, name=name, tags=list(cfg.tags),
            id=run_id, resume="allow",
            config=recipe, mode=mode,
            # WANDB_DIR, when set, chooses where run files go; else next to the checkpoints
            dir=None if os.environ.get("WANDB_DIR") else str(output_dir),
            settings=wandb.Settings(init_timeout=init_timeout_s),
        )
    except Exception as e:  # never retry offline in this process: that can hang
        logger.warning("W&B disabled: wandb.init failed after %.0f s: %s", time.monotonic() - started,
                       flat(e))  # wandb's errors span lines
        _bounded_teardown()
        return None
    run.define_metric("train/step")
    run.define_metric("train/*", step_metric="train/step")
    run.define_metric("epoch")
    run.define_metric("epoch/*", step_metric="epoch")
    run.define_metric("epoch/val_top1", step_metric="epoch", summary="max")
    logger.info("W&B run %r (id %s, %s) in %s", name, run_id, mode, run.dir)
    return run
