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

# Workers are forked on Linux even where the process itself was spawned (mp.spawn sets
# "spawn" as the default): a spawned worker re-imports torch and timm, 5-20 s per worker
# per epoch. The workers touch no CUDA state.
_WORKER_START = "fork" if sys.platform.startswith("linux") else None
_OURS: set = set()  # the worker processes our loaders started: the only ones the exit hook kills


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker leaves preemption to its trainer: Ctrl+C or a signal to the process group
    must not kill it mid-epoch while the trainer still needs a batch to reach a step boundary.
    The trainer shuts its workers down when it stops; if it dies, they notice and exit."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before it
def _kill_leftover_workers() -> None:
    """At exit multiprocessing stops daemonic children with SIGTERM, which our workers ignore:
    a loader left unfinished (an exception, a stop mid-epoch) would hang the exit. Kill those
    of ours still alive; other libraries' children are theirs to stop."""
    children = [child for child in multiprocessing.active_children() if child in _OURS]
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these kills as failures
    for child in children:
        child.kill()


def iterate(dataset: IterableDataset, workers: int, pin_memory: bool) -> Iterator:
    """An iterator over the dataset itself (workers=0) or over a DataLoader whose items are
    whole batches; the worker processes it starts are remembered for the exit hook."""
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
    """Shut a DataLoader iterator's workers down now. Left to garbage collection, an iterator
    that an exception's traceback still references keeps its workers alive, and they ignore
    the stop signals. The DataLoader has no public close(): this is what its own __del__ runs."""
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
