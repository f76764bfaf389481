"""Process-group setup from torchrun's environment, and the few collectives training uses; in a single
process (plain ``python train.py``) the collectives are identities."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int  # process index on this machine: picks the GPU
    world_size: int
    device: torch.device
    is_main: bool  # rank 0: the only process that logs, tracks and saves
    control_group: Any = field(default=None, compare=False)  # gloo group for CPU-side agreement; None alone


def choose_device(requested: str, local_rank: int, world_size: int, cuda: bool, what: str = "device") -> torch.device:
    """The device of this process: ``requested`` ("" = cuda:LOCAL_RANK when ``cuda`` is available, else
    cpu; a bare "cuda" = cuda:LOCAL_RANK). Under torchrun a GPU other than LOCAL_RANK's is refused:
    NCCL binds each rank to its own. Raises ValueError with one line."""
    device = torch.device(requested or ("cuda" if cuda else "cpu"))
    if device.type == "cuda" and not cuda:
        raise ValueError(f"{what} {requested}: CUDA is not available")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    if device.type == "cuda" and world_size > 1 and device.index != local_rank:
        raise ValueError(f"{what} {requested}: under torchrun each rank uses its own GPU (cuda:LOCAL_RANK, here "
                         f"cuda:{local_rank}); give 'cuda' or leave the device out")
    return device


def init_distributed(timeout_s: float = 1800.0, device: torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes (env://; none at WORLD_SIZE unset or 1) on ``device``
    (default: choose_device's): NCCL when it is a GPU, else gloo, so collectives get its tensors.
    timeout_s bounds a collective's wait for a stuck rank; the gloo control group carries CPU-side agreements."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or choose_device("", local_rank, world_size, torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
            # binding the device up front lets NCCL connect eagerly and avoids a guess
            device_id=device if device.type == "cuda" else None,
        )
        logger.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, device)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if world_size > 1 else None
    return DistInfo(rank, local_rank, world_size, device, rank == 0, control)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum tensor over all ranks in place (and return it); identity in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable object per rank, indexed by rank (e.g. RNG states for a checkpoint)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """src's obj on every rank (e.g. the checkpoint path rank 0 chose to resume from)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers, the ones it saves (under DDP each rank's BN statistics differ)."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
