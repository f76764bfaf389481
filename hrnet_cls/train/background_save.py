"""Checkpoint saves that do not stall training: the state snapshotted into host memory in the loop,
the files written in a thread, one write in flight, its error raised at the next step (docs/design.md
§6.3). A thread, not a process: the snapshot is already in this process, and the write is mostly
the kernel copying and hashing bytes. The thread is not a daemon, so an exit lets a write finish."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch


def snapshot(obj: Any, buffers: dict[tuple, torch.Tensor], path: tuple = ()) -> Any:
    """``obj`` with every tensor copied to host memory (containers rebuilt, other leaves shared:
    they are not changed in place by training). ``buffers``: pinned copies of CUDA tensors,
    reused by the next snapshot (the caller syncs the stream before they are read)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu":
            return obj.detach().clone()
        buf = buffers.get(path)
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
            buf = buffers[path] = torch.empty_like(obj, device="cpu", pin_memory=True)
        return buf.copy_(obj.detach(), non_blocking=True)
    if isinstance(obj, dict):
        return {k: snapshot(v, buffers, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, buffers, (*path, i)) for i, v in enumerate(obj))
    return obj


class BackgroundSave:
    """One checkpoint write at a time, in a thread (``enabled``) or in the caller."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.stall_s = 0.0  # seconds the caller spent in submit() and wait(): the loop's checkpoint time
        self.write_s = 0.0  # seconds the writes took, in whichever thread ran them
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[dict], None], state: dict) -> None:
        """Write ``state`` with ``write(state)``: after the save in flight, if any, has finished."""
        began = time.perf_counter()
        try:
            self._join()
            self.check()
            if not self.enabled:
                self._write(write, state)
                self.check()
                return
            copy = snapshot(state, self.buffers)
            if self.buffers:
                torch.cuda.current_stream().synchronize()  # the pinned copies are complete
            self._thread = threading.Thread(target=self._write, args=(write, copy), name="checkpoint-writer")
            self._thread.start()
        finally:
            self.stall_s += time.perf_counter() - began

    def _write(self, write: Callable[[dict], None], state: dict) -> None:
        began = time.perf_counter()
        try:
            write(state)
        except BaseException as exc:  # noqa: BLE001 - raised again in the training thread by check()
            self._error = exc
        finally:
            self.write_s += time.perf_counter() - began

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def check(self) -> None:
        """Raise the error of a write that failed (once), in the caller's thread."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Until the save in flight is written; raises its error."""
        began = time.perf_counter()
        try:
            self._join()
        finally:
            self.stall_s += time.perf_counter() - began
        self.check()
