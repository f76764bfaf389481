"""Stop signals (SIGTERM, SIGUSR1, SIGINT, SIGHUP) agreed across ranks at one step boundary
(docs/design.md §6.6). The first signal sets a flag that rides an asynchronous MAX all_reduce on a
gloo group, so every rank stops after the same step without a device sync; a repeat within
``REPEAT_S`` is the same signal delivered twice, a later one stops at once without saving, and once
the stop is agreed every stop signal is ignored until the process exits (status 75).
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL, "try again later": the same command continues where the run stopped
# Ctrl+C; a scheduler's or torchrun's stop; `sbatch --signal=USR1@120`; a closed terminal
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
REPEAT_S = 2.0  # a repeated signal sooner than this is the same one delivered twice


class Preempted(Exception):
    """Training stopped on a signal at a step boundary, after rank 0 saved last.pth; its text says where."""


class StopRequest:
    """The stop signals of this process and the agreement on them across ranks."""

    def __init__(self, group: Any = None) -> None:
        self.group = group  # a gloo process group over all ranks, or None in one process
        self.signal: int | None = None  # the first stop signal received
        self._at = 0.0  # when it came (time.monotonic)
        self._previous: dict[int, Any] = {}
        self._flag = np.zeros(2, dtype=np.int32)  # [stop, save]: the all_reduce writes here; read without torch
        self._work: Any = None
        self._ignoring = False  # the stop is agreed: signals are ignored until the process exits
        self.save_agreed = False  # poll()'s other answer: every rank saves a checkpoint here

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and time.monotonic() - self._at < REPEAT_S:
            return  # the same signal, delivered twice
        if self.signal is not None:  # a second signal: the user means now
            self.restore()
            logger.warning("second %s: stopping now, without saving", signal.Signals(signum).name)
            signal.raise_signal(signum)
            return
        self.signal, self._at = signum, time.monotonic()
        logger.warning("%s received: stopping at the next step boundary; the checkpoint is saved there "
                       "(a second signal stops at once, without saving)", signal.Signals(signum).name)

    def ignore(self) -> None:
        """Ignore stop signals from now on, to the end of the process: the run has stopped and
        only saves and cleans up (torchrun sends SIGTERM to a rank still exiting when another
        has exited; the scheduler's repeat may come later still)."""
        self._ignoring = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _agreed(self, stop: bool) -> bool:
        if stop:
            self.ignore()
            logger.info("every rank stops here: saving the checkpoint; stop signals are ignored from now on")
        return stop

    def restore(self) -> None:
        """Put back the handlers that were there before install() (not after a stop: see ignore)."""
        if self._ignoring:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def poll(self, save: bool = False) -> bool:
        """Collective, called by every rank after every step: whether all ranks stop here.

        ``save``: this rank asks for a checkpoint (rank 0's save clock, checkpoint.save_interval_min);
        the same reduction answers it, in ``save_agreed``, alike on every rank and as late as a stop."""
        if self.group is None:
            self.save_agreed = save
            return self._agreed(self.signal is not None)
        agreed = self.save_agreed = False
        if self._work is not None:
            self._work.wait()
            agreed, self.save_agreed = bool(self._flag[0]), bool(self._flag[1])
        self._flag[:] = (int(self.signal is not None), int(save))
        self._work = dist.all_reduce(torch.from_numpy(self._flag), op=dist.ReduceOp.MAX, group=self.group,
                                     async_op=True)
        return self._agreed(agreed)

    def agree(self) -> bool:
        """Collective and blocking: whether any rank has received a stop signal by now."""
        if self.group is None:
            return self._agreed(self.signal is not None)
        self.settle()
        self._flag[:] = (int(self.signal is not None), 0)
        dist.all_reduce(torch.from_numpy(self._flag), op=dist.ReduceOp.MAX, group=self.group)
        return self._agreed(bool(self._flag[0]))

    def settle(self) -> None:
        """Wait for the agreement in flight (before the process group goes away)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
