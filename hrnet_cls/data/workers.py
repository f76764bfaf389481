"""DataLoader workers for the loaders, and the argument checks they share."""
from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import sys
from typing import Iterator

from torch.utils.data import DataLoader, IterableDataset

from hrnet_cls.data.transforms import INTERPOLATIONS
from hrnet_cls.train.preemption import STOP_SIGNALS

# fork on Linux even under mp.spawn: a spawned worker re-imports torch and timm, 5-20 s each (no CUDA in workers)
_WORKER_START = "fork" if sys.platform.startswith("linux") else None
_OURS: set = set()  # the worker processes our loaders started: the only ones the exit hook kills


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ignore_stop_signals(worker_id: int) -> None:
    """Leave stop signals to the trainer: it may need a batch to reach a step boundary, then stops its workers."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _kill_leftover_workers() -> None:
    """Kill our workers still alive at exit: they ignore multiprocessing's SIGTERM, so they would hang it."""
    children = [child for child in multiprocessing.active_children() if child in _OURS]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these kills as failures
    for child in children:
        child.kill()


def iterate(dataset: IterableDataset, workers: int, pin_memory: bool) -> Iterator:
    """The dataset itself (workers=0) or a DataLoader of its whole batches, its workers kept for the exit hook."""
    if workers == 0:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        multiprocessing_context=_WORKER_START, worker_init_fn=_ignore_stop_signals)
    before = set(multiprocessing.active_children())
    batches = iter(loader)  # starts the workers (the DataLoader keeps their handles private)
    _OURS.difference_update([c for c in _OURS if not c.is_alive()])
    _OURS.update(set(multiprocessing.active_children()) - before)
    return batches


def stop_workers(batches: Iterator) -> None:
    """Shut a DataLoader iterator's workers down now (a traceback may hold it): what its __del__ would run."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def check_common(batch_size: int, img_size: int, rank: int, world_size: int, workers: int,
                 interpolation: str) -> None:
    if batch_size < 1 or img_size < 1:
        raise ValueError(f"batch_size={batch_size} and img_size={img_size} must be positive")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in 0..world_size-1 (world_size={world_size})")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}: expected one of {INTERPOLATIONS}")
