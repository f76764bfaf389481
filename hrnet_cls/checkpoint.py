"""Training checkpoints: the state of a run, atomic saves, and which file to resume from.

Reading weights for fine-tuning or validation is hrnet_cls.weights' job.

Checkpoint dict (every value loads with ``torch.load(weights_only=True)``, so timm's
``load_checkpoint`` reads it too; timm takes 'model_ema' when not None, else 'model'):

    model           state_dict of the bare model (no 'module.' / '_orig_mod.' prefixes)
    model_ema       state_dict of the EMA weights, or None
    optimizer       optimizer.state_dict()
    scaler          GradScaler.state_dict() ({} when loss scaling is off), or None
    epoch           epoch to resume in, 0-based (= number of completed epochs when
                    batch_in_epoch is 0)
    batch_in_epoch  batches of that epoch already trained on (0 at an epoch boundary)
    step            global optimizer steps taken; the LR schedule is a function of it
    rng             one capture_rng() dict per rank, indexed by rank
    config          config_to_dict(cfg) of the run
    model_name      timm model name
    git_commit      commit hash (+ "-dirty"), or None outside a git checkout
    metrics         dict of the latest metrics, e.g. {"val_top1": 76.9}
    best_metric     best metric so far (written by CheckpointManager)

Files in output_dir: last.pth (every save), best.pth (best metric), epoch_XXXX.pth (the k
newest epoch ends; XXXX = 0-based index of the finished epoch, as in summary.csv).
"""
from __future__ import annotations

import logging
import os
import random
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models import clean_state_dict  # strips DDP 'module.' / torch.compile '_orig_mod.'
from timm.utils import unwrap_model  # the bare model inside DDP, torch.compile and EMA wrappers
from torch import nn

from hrnet_cls.weights import read_file

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = ("model", "optimizer", "epoch", "step", "batch_in_epoch")


# ---------------------------------------------------------------- small helpers


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD commit of repo, with "-dirty" when tracked files differ; None if not a checkout."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()

        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, as builtins and tensors (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        # Only touch CUDA if this process already uses it: querying would initialise it.
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Inverse of capture_rng()."""
    random.setstate(_as_tuple(rng["python"]))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples, which a round trip may have turned into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------- state dicts


def build_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    step: int,
    batch_in_epoch: int,
    config: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    model_ema: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    rng: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict described in the module docstring.

    rng: one capture_rng() per rank (gather with distributed.all_gather_object on every
    rank before rank 0 saves); default: this process only.
    """
    ema = None
    if model_ema is not None:
        ema = clean_state_dict(unwrap_model(getattr(model_ema, "module", model_ema)).state_dict())
    return {
        "model": clean_state_dict(unwrap_model(model).state_dict()),
        "model_ema": ema,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "batch_in_epoch": batch_in_epoch,
        "rng": rng if rng is not None else [capture_rng()],
        "config": dict(config),
        "model_name": config.get("model", {}).get("name", type(unwrap_model(model)).__name__),
        "git_commit": git_commit(),
        "metrics": dict(metrics or {}),
    }


def restore_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    model_ema: nn.Module | None = None,
    rank: int = 0,
) -> None:
    """Load a checkpoint dict back into the training objects (strict) and this rank's RNG."""
    unwrap_model(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if model_ema is not None:
        ema_module = unwrap_model(getattr(model_ema, "module", model_ema))
        if state.get("model_ema") is None:
            logger.warning("checkpoint has no EMA weights; the EMA starts from the model weights")
        ema_module.load_state_dict(state.get("model_ema") or state["model"])
    rngs = state.get("rng") or []
    if rank < len(rngs):
        restore_rng(rngs[rank])
    else:
        logger.warning("checkpoint holds RNG states for %d ranks, none for rank %d; RNG not restored", len(rngs), rank)


# ---------------------------------------------------------------- atomic files


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Call write(file) on a temp file in path's directory, fsync it, rename it onto path.

    A crash at any point leaves either the old file or the new one, never a mix; temp
    files are dot-files ending in .tmp, which nothing here treats as a checkpoint.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """torch.save state to path atomically (see _atomic_write)."""
    _atomic_write(Path(path), lambda f: torch.save(dict(state), f))


def _atomic_link(src: Path, dst: Path) -> None:
    """Make dst another name for src's bytes (hard link; copy where links are unsupported)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        _atomic_write(dst, lambda f: f.write(src.read_bytes()))
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load one of our checkpoints on the CPU; raises if unreadable or not a training checkpoint."""
    state = read_file(path, mmap=mmap)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint dict ({type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint, missing {missing}")
    return state


# ---------------------------------------------------------------- resume


def _candidates(output_dir: Path) -> list[Path]:
    """Checkpoint files in output_dir (never the .tmp files of an interrupted save)."""
    names = [output_dir / "last.pth", *output_dir.glob("epoch_[0-9]*.pth"), output_dir / "best.pth"]
    return [p for p in names if p.is_file()]


def _readable_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """(stored step, path) of every checkpoint that loads, newest first; warns on the rest.

    mmap keeps this cheap: tensors are mapped, not read. Ties prefer last.pth.
    """
    found = []
    for order, path in enumerate(_candidates(output_dir)):
        try:
            step = int(load_checkpoint(path, mmap=True)["step"])
        except Exception as e:  # truncated zip, garbage, foreign dict: all mean "skip it"
            logger.warning("skipping unreadable checkpoint %s: %s", path, " ".join(str(e).split())[:200])
            continue
        found.append((step, -order, path))
    return [(step, path) for step, _, path in sorted(found, reverse=True)]


def find_resume(output_dir: str | Path) -> Path | None:
    """The newest (by stored step) checkpoint in output_dir that loads, or None."""
    found = _readable_steps(Path(output_dir))
    return found[0][1] if found else None


def resume_path(resume: str, output_dir: str | Path) -> Path | None:
    """Which checkpoint checkpoint.resume means: "" = none, "auto" = find_resume(output_dir)
    (None when there is none), else that path, which must exist.

    Under DDP decide on rank 0 and share the answer (distributed.broadcast_object), so
    that every rank loads the same file with load_checkpoint.
    """
    if resume == "":
        return None
    if resume == "auto":
        return find_resume(output_dir)
    if not Path(resume).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume!r} does not exist")
    return Path(resume)


class CheckpointManager:
    """Writes last/best/epoch checkpoints of one run; use on the main rank only."""

    def __init__(self, output_dir: str | Path, keep: int):
        self.output_dir = Path(output_dir)
        self.keep = keep  # epoch_XXXX.pth files kept besides last.pth and best.pth
        self.best_metric: float | None = None  # higher is better (top-1)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.output_dir.glob(".*.tmp"):  # left by a save that was killed
            logger.info("removing %s left by an interrupted save", stale)
            stale.unlink(missing_ok=True)

    def save(self, state: Mapping[str, Any], metric: float | None = None, epoch_end: bool = True) -> Path:
        """Write last.pth; at an epoch end also epoch_XXXX.pth; best.pth if metric improved.

        epoch_end requires state["batch_in_epoch"] == 0; XXXX = state["epoch"] - 1.
        """
        improved = metric is not None and (self.best_metric is None or metric > self.best_metric)
        if improved:
            self.best_metric = metric
        last = self.output_dir / "last.pth"
        save_checkpoint(last, {**state, "best_metric": self.best_metric})
        if epoch_end and self.keep > 0:
            if state["batch_in_epoch"] != 0 or state["epoch"] < 1:
                raise ValueError("epoch_end save needs batch_in_epoch == 0 and epoch >= 1")
            _atomic_link(last, self.output_dir / f"epoch_{state['epoch'] - 1:04d}.pth")
            self._prune()
        if improved:
            _atomic_link(last, self.output_dir / "best.pth")
            logger.info("new best metric %.4f, saved %s", metric, self.output_dir / "best.pth")
        return last

    def _prune(self) -> None:
        epochs = sorted(self.output_dir.glob("epoch_[0-9]*.pth"))
        for old in epochs[: max(0, len(epochs) - self.keep)]:
            old.unlink(missing_ok=True)
