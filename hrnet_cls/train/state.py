"""Training checkpoints: the state of a run as a dict, and one checkpoint file read or written.

Reading weights for fine-tuning or validation is hrnet_cls.models.weights' job.

Checkpoint dict (every value loads with ``torch.load(weights_only=True)``, so timm's
``load_checkpoint`` reads it too; timm takes 'model_ema' when not None, else 'model'):

    model           state_dict of the bare model (no 'module.' / '_orig_mod.' prefixes)
    model_ema       state_dict of the EMA weights, or None
    optimizer       optimizer.state_dict()
    scaler          GradScaler.state_dict() ({} when loss scaling is off), or None
    epoch           epoch to resume in, 0-based (= number of completed epochs when
                    batch_in_epoch is 0)
    batch_in_epoch  batches of that epoch already trained on (0 at an epoch boundary)
    step            global optimizer steps taken (the LR schedule follows samples, not steps)
    rng             one capture_rng() dict per rank, indexed by rank
    config          config_to_dict(cfg) of the run
    model_name      timm model name
    git_commit      commit hash (+ "-dirty"), or None outside a git checkout
    metrics         dict of the latest metrics, e.g. {"val_top1": 76.9}
    best_metric     best metric so far (written by run_dir.RunDir.save)
    data            TrainLoader.state(): the loader layout (world size, workers, batch, shards), the
                    samples its plan excluded, and the positions trained on in this epoch (packed
                    bits; None at an epoch end), from which any layout can continue

Which files of a run folder hold checkpoints, and which one a run resumes from, is
hrnet_cls.train.checkpointer's job; putting the training objects back is hrnet_cls.train.resume's.
"""
from __future__ import annotations

import logging
import random
import subprocess
from collections.abc import Mapping
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
    data: dict[str, Any] | None = None,
    epoch_sums: Mapping[str, float] | None = None,
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
        "data": data,
        "epoch_sums": dict(epoch_sums) if epoch_sums else None,
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
    """Load a checkpoint dict back into the training objects (strict) and this rank's RNG.

    The RNG states (dropout, drop path) are restored only when the checkpoint has one per rank
    of this world size; otherwise the caller's seeding stands (the data order does not use them).
    """
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


# ---------------------------------------------------------------- files


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """torch.save state to path atomically, with its sha256 beside it (hrnet_cls.atomic)."""
    write_atomic(Path(path), lambda f: torch.save(dict(state), f), checksum=True)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load one of our checkpoints on the CPU; raises if unreadable or not a training checkpoint."""
    state = read_file(path, mmap=mmap)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a checkpoint dict ({type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not a training checkpoint, missing {missing}")
    return state


def check_checkpoint(path: Path) -> bool:
    """True: path verified against its .sha256 (and its pickle reads); False: it has no .sha256
    and loaded in full (every tensor read). Raises ChecksumError, or the reading error, otherwise."""
    verified = verify(path)
    load_checkpoint(path, mmap=verified)  # verified bytes: the pickle is all that is left to read
    return verified
