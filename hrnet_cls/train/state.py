"""The state of a run as a checkpoint dict, where it stands (:class:`Position`), and one file read or
written. The dict's keys are listed in docs/design.md §6.1; every value loads with
``torch.load(weights_only=True)``, so timm's ``load_checkpoint`` reads it too."""
from __future__ import annotations

import logging
import random
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models import clean_state_dict  # strips DDP 'module.' / torch.compile '_orig_mod.'
from timm.utils import unwrap_model  # the bare model inside DDP, torch.compile and EMA wrappers
from torch import nn

from hrnet_cls.atomic import verify, write_atomic
from hrnet_cls.models.weights import read_file

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = ("model", "optimizer", "epoch", "step", "batch_in_epoch")


@dataclass(frozen=True)
class EpochSums:
    """An epoch's running totals over every process; a mid-epoch checkpoint carries them, so the
    epoch's row after a resume covers the whole epoch."""

    loss_sum: float = 0.0  # of the finite per-process step losses
    losses: int = 0  # per-process step losses (steps x processes)
    nonfinite: int = 0  # of those, NaN / inf
    images: int = 0
    skipped: int = 0
    time_s: float = 0.0  # training time

    def __add__(self, other: EpochSums) -> EpochSums:
        return EpochSums(*(a + b for a, b in zip(astuple(self), astuple(other))))


@dataclass(frozen=True)
class Position:
    """Where a run stands: what a checkpoint stores besides the weights and optimizer."""

    epoch: int = 0  # 0-based epoch to continue in (= epochs completed when batch_in_epoch is 0)
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of that epoch already trained (0: at its start)
    metrics: dict[str, float] = field(default_factory=dict)  # the latest validation metrics
    best_metric: float | None = None  # best val top-1 so far
    data: dict[str, Any] | None = None  # TrainLoader.state(): layout and the samples trained on
    epoch_sums: EpochSums | None = None  # of the stopped epoch (None at an epoch end)

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> Position:
        sums = state.get("epoch_sums")
        return cls(epoch=int(state["epoch"]), step=int(state["step"]), batch_in_epoch=int(state["batch_in_epoch"]),
                   metrics=dict(state.get("metrics") or {}), best_metric=state.get("best_metric"),
                   data=state.get("data"), epoch_sums=EpochSums(**sums) if sums else None)


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
    """This process's RNG states, as builtins and tensors (weights_only-loadable); on CUDA the current
    device's generator only, so any layout of visible devices can restore it."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,  # querying would initialise it
    }


def own_cuda_state(saved: Any, device: int) -> torch.Tensor | None:
    """The CUDA generator state to give the current ``device``: the one saved, or from a checkpoint that
    saved every visible device's (a list; before 2026-12-08) the entry of this device index, if any."""
    if isinstance(saved, (list, tuple)):
        return saved[device] if device < len(saved) else None
    return saved


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Inverse of capture_rng()."""
    random.setstate(_as_tuple(rng["python"]))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = own_cuda_state(rng.get("cuda"), torch.cuda.current_device())
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples, which a round trip may have turned into lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def build_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    config: Mapping[str, Any],
    model_ema: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    rng: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict of the training objects at ``position``; rng: one capture_rng() per
    rank (default: this process only)."""
    ema = None
    if model_ema is not None:
        ema = clean_state_dict(unwrap_model(getattr(model_ema, "module", model_ema)).state_dict())
    sums = position.epoch_sums if position.batch_in_epoch else None
    return {
        "model": clean_state_dict(unwrap_model(model).state_dict()),
        "model_ema": ema,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": position.epoch,
        "step": position.step,
        "batch_in_epoch": position.batch_in_epoch,
        "rng": rng if rng is not None else [capture_rng()],
        "config": dict(config),
        "model_name": config.get("model", {}).get("name", type(unwrap_model(model)).__name__),
        "git_commit": git_commit(),
        "metrics": dict(position.metrics),
        "best_metric": position.best_metric,
        "data": position.data,
        "epoch_sums": asdict(sums) if sums else None,
    }


def restore_state(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    model_ema: nn.Module | None = None,
    rank: int = 0,
    world_size: int | None = None,
) -> None:
    """Load a checkpoint dict back into the training objects (strict) and this rank's RNG, the
    latter only when the checkpoint has one per rank of this world size (the data order does not
    use it)."""
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
    if len(rngs) == (world_size or len(rngs)) and rank < len(rngs):
        restore_rng(rngs[rank])
    elif rank == 0:
        logger.info("checkpoint holds RNG states for %d process(es), this run has %s: dropout and drop-path "
                    "draws start afresh", len(rngs), world_size)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """torch.save state to path atomically, with its sha256 beside it."""
    write_atomic(Path(path), lambda f: torch.save(dict(state), f), checksum=True)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """One of our checkpoints, on the CPU; raises if unreadable or not a training checkpoint."""
    state = read_file(path, mmap=mmap)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint dict ({type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint, missing {missing}")
    return state


def read_verified(path: Path) -> tuple[dict[str, Any], bool]:
    """(the checkpoint, whether it matched its .sha256). A verified file is memory-mapped (its
    bytes are known good); one without a .sha256 is read in full, every tensor, so a truncated one
    fails here. Raises ChecksumError, or the reading error, otherwise."""
    verified = verify(path)
    return load_checkpoint(path, mmap=verified), verified
